"""What a synthetic slide's pixels are made of: tissue codes shared by the scene and the renderer."""

from __future__ import annotations

import numpy as np

# Shapes are drawn in order, so later codes cover earlier ones.
GLASS, STROMA, EPI_BENIGN, EPI_TUMOR, LUMEN, SHEET, NUC_STROMA, NUC_EPI, NUC_TUMOR = range(9)
NUCLEUS_CODES = np.array([NUC_STROMA, NUC_EPI, NUC_TUMOR], np.uint8)  # by NUCLEUS_CLASSES index
