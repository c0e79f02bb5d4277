"""Contact sheets of streamed tiles with their targets drawn over them: what the model will see."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pathray.wsi.classes import GLEASON_CLASSES, NUCLEUS_CLASSES


def _colour(name: str) -> tuple[int, int, int]:
    for cls in (*GLEASON_CLASSES, *NUCLEUS_CLASSES):
        if cls.name == name:
            return cls.color
    # a stable colour for class names pathray does not know
    h = abs(hash(name)) % 360
    return tuple(int(127 + 127 * np.cos(np.radians(h + k))) for k in (0, 120, 240))  # type: ignore[return-value]


def draw_tile(
    row: dict[str, Any], task: str, classes: list[str], point_classes: list[str], size: int
) -> Image.Image:
    """One tile with its target: class colours blended in, points as dots, instance outlines, labels."""
    image = row.get("image", row.get("global_0"))
    base = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    scale = size / base.width
    target = row.get("target")
    if task == "segmentation" and target is not None:
        mask = np.asarray(target)
        lut = np.array([_colour(c) for c in classes] + [(0, 0, 0)] * (256 - len(classes)), np.uint8)
        colour = Image.fromarray(lut[mask])
        alpha = Image.fromarray(((mask > 0) * 110).astype(np.uint8))
        base.paste(colour, (0, 0), alpha)
    elif task == "instance" and target is not None:
        inst = np.asarray(target)
        edge = (inst != np.roll(inst, 1, 0)) | (inst != np.roll(inst, 1, 1))
        arr = np.asarray(base).copy()
        arr[edge & (inst > 0)] = (0, 255, 255)
        base = Image.fromarray(arr)
    base = base.resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(base)
    if task == "detection" and target is not None:
        for x, y, c in np.asarray(target):
            if c < 0:
                continue
            r = 3
            colour = _colour(point_classes[int(c)]) if int(c) < len(point_classes) else (255, 255, 0)
            draw.ellipse(
                [x * scale - r, y * scale - r, x * scale + r, y * scale + r], outline=colour, width=2
            )
    if task == "classification" and target is not None:
        name = classes[int(target)] if int(target) < len(classes) else str(target)
        draw.rectangle([0, 0, size - 1, size - 1], outline=_colour(name), width=5)
        draw.text((6, size - 16), name, fill=(0, 0, 0))
    caption = f"{row['slide_id']} {float(row['mpp']):g} um/px"
    draw.rectangle([0, 0, min(size, 7 * len(caption)), 12], fill=(255, 255, 255))
    draw.text((2, 0), caption, fill=(0, 0, 0))
    return base


def contact_sheet(
    rows: list[dict[str, Any]], task: str, classes: list[str], point_classes: list[str], cell: int = 160
) -> Image.Image:
    """Tiles in a near-square grid, targets drawn over each, a legend of class colours underneath."""
    n = max(1, len(rows))
    cols = int(np.ceil(np.sqrt(n)))
    grid_rows = int(np.ceil(n / cols))
    legend = classes if task != "detection" else point_classes
    sheet = Image.new("RGB", (cols * cell, grid_rows * cell + 20), (255, 255, 255))
    for i, row in enumerate(rows):
        sheet.paste(
            draw_tile(row, task, classes, point_classes, cell), ((i % cols) * cell, (i // cols) * cell)
        )
    draw = ImageDraw.Draw(sheet)
    x = 4
    for name in legend if task != "ssl" else []:
        draw.rectangle([x, grid_rows * cell + 5, x + 10, grid_rows * cell + 15], fill=_colour(name))
        draw.text((x + 14, grid_rows * cell + 4), name, fill=(0, 0, 0))
        x += 20 + 7 * len(name)
    return sheet


def preview(config: Any, n: int, out: Any, epoch: int = 0) -> dict[str, Any]:
    """Stream ``n`` tiles as the project config says and write their contact sheet to ``out``.

    Returns what was shown and what the stream had to leave out, so the CLI can say it.
    """
    from pathlib import Path

    from pathray.cluster.ray_local import ensure_ray
    from pathray.datasets.faults import FaultLedger
    from pathray.datasets.manifest import ManifestError, load_manifest, validate_manifest
    from pathray.datasets.stream import build_tile_dataset

    data = config.data
    if not data.manifest:
        raise ManifestError("config", ["data.manifest is not set (a Parquet/CSV manifest path or URI)"])
    manifest = load_manifest(data.manifest, config.storage)
    validate_manifest(manifest, data.manifest, config.storage, check_uris=data.check_uris)
    ensure_ray()
    faults = FaultLedger()
    # Small chunks, so the first n tiles come from many slides rather than one slide's chunk.
    slides = manifest[manifest["split"] == data.split] if data.split else manifest
    per_slide = max(1, -(-n // max(1, len(slides))))
    stream = data.stream.model_copy(update={"read_batch": min(data.stream.read_batch, per_slide)})
    ds = build_tile_dataset(
        manifest, stream, config.storage, split=data.split, epoch=epoch, faults=faults, tissue=config.tissue
    )
    rows = ds.take(n)
    target = data.stream.target
    sheet = contact_sheet(rows, target.task, target.classes, target.point_classes)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return {"tiles": len(rows), "out": str(path), "faults": faults.summary()}
