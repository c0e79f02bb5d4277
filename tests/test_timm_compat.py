"""timm imports through the one torchvision workaround, in this process and in a fresh one."""

from __future__ import annotations

import subprocess
import sys


def test_import_timm_in_a_fresh_process():
    code = (
        "from pathray.models.timm_compat import import_timm\n"
        "import torch\n"
        "timm = import_timm()\n"
        "m = timm.create_model('resnet18', pretrained=False, num_classes=3).eval()\n"
        "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 3)")
