"""Contact sheets of streamed tiles with their targets drawn over them: what the model will see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pathray.models.tasks import TaskSpec
from pathray.wsi.annotations import class_color


def draw_tile(row: dict[str, Any], task: TaskSpec, size: int) -> Image.Image:
    """One tile (the first view, for tasks with views) with its target drawn over it and a caption."""
    image = row.get("image", row.get("global_0"))
    base = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    if row.get("target") is not None:
        base = task.draw(base, row["target"], class_color)
    base = base.resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(base)
    caption = f"{row['slide_id']} {float(row['mpp']):g} um/px"
    draw.rectangle([0, 0, min(size, 7 * len(caption)), 12], fill=(255, 255, 255))
    draw.text((2, 0), caption, fill=(0, 0, 0))
    return base


def contact_sheet(rows: list[dict[str, Any]], task: TaskSpec, cell: int = 160) -> Image.Image:
    """Tiles in a near-square grid, targets drawn over each, a legend of the task's classes underneath."""
    n = max(1, len(rows))
    cols = int(np.ceil(np.sqrt(n)))
    grid_rows = int(np.ceil(n / cols))
    sheet = Image.new("RGB", (cols * cell, grid_rows * cell + 20), (255, 255, 255))
    for i, row in enumerate(rows):
        sheet.paste(draw_tile(row, task, cell), ((i % cols) * cell, (i // cols) * cell))
    draw = ImageDraw.Draw(sheet)
    x = 4
    for i, name in enumerate(task.classes or task.point_classes):
        draw.rectangle([x, grid_rows * cell + 5, x + 10, grid_rows * cell + 15], fill=class_color(name, i))
        draw.text((x + 14, grid_rows * cell + 4), name, fill=(0, 0, 0))
        x += 20 + 7 * len(name)
    return sheet


def preview(
    data: Any, task: TaskSpec, storage: Any, tissue: Any, n: int, out: str | Path, epoch: int = 0
) -> dict[str, Any]:
    """Stream ``n`` tiles as the ``data`` section says and write their contact sheet to ``out``.

    Needs a running Ray. Returns what was shown and what the stream had to leave out, so the CLI
    can say it.
    """
    from pathray.datasets.faults import FaultLedger
    from pathray.datasets.manifest import ManifestError, load_manifest, validate_manifest
    from pathray.datasets.stream import build_tile_dataset

    if not data.manifest:
        raise ManifestError("config", ["data.manifest is not set (a Parquet/CSV manifest path or URI)"])
    manifest = load_manifest(data.manifest, storage)
    validate_manifest(manifest, data.manifest, storage, check_uris=data.check_uris)
    faults = FaultLedger()
    # Small chunks, so the first n tiles come from many slides rather than one slide's chunk.
    slides = manifest[manifest["split"] == data.split] if data.split else manifest
    per_slide = max(1, -(-n // max(1, len(slides))))
    stream = data.stream.model_copy(update={"read_batch": min(data.stream.read_batch, per_slide)})
    ds = build_tile_dataset(
        manifest, stream, task, storage, split=data.split, epoch=epoch, faults=faults, tissue=tissue
    )
    rows = ds.take(n)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, task).save(path)
    return {"tiles": len(rows), "out": str(path), "faults": faults.summary()}
