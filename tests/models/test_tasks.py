"""Every task on a tiny stand-in engine: head shapes, a loss that overfits, decoding and matching."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from pathray.models.instances import (
    InstanceMetric,
    distance_target,
    instance_counts,
    instance_targets,
    postprocess_instances,
)
from pathray.models.points import DetectionMetric, decode_points, render_heatmaps
from pathray.models.tasks import build_task, task_config
from pathray.registry import TASKS, RegistryError

H = W = 32


class TinyEngine(nn.Module):
    """The engine contract in miniature: ``x -> (pooled (B, 16), dense (B, 8, H/4, W/4))``."""

    embed_dim, dense_channels, dense_stride = 16, 8, 4

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.stem(x)
        return self.pool(dense.mean((2, 3))), dense


def instance_map() -> np.ndarray:
    m = np.zeros((H, W), np.int32)
    m[2:8, 3:12] = 1
    m[14:22, 4:9] = 2
    yy, xx = np.mgrid[:H, :W]
    m[(yy - 22) ** 2 + (xx - 22) ** 2 <= 20] = 3
    return m


def make_batch(name: str, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (b, H, W, 3), dtype=torch.uint8, generator=g)}
    batch["mpp"] = torch.full((b,), 0.5, dtype=torch.float64)
    if name == "segmentation":
        batch["target"] = torch.randint(0, 5, (b, H // 8, W // 8), generator=g).repeat_interleave(8, 1)
        batch["target"] = batch["target"].repeat_interleave(8, 2).to(torch.uint8)
        batch["image"][..., 0] = batch["target"] * 50  # learnable: red says the class
    elif name == "classification":
        batch["target"] = torch.tensor([1, 3])[:b]
    elif name == "detection":
        pts = torch.full((b, 8, 3), -1.0)
        pts[:, :3] = torch.tensor([[5.5, 6.5, 0], [20.5, 9.5, 1], [12.5, 25.5, 2]])
        batch["target"] = pts
    elif name == "instance":
        batch["target"] = torch.from_numpy(np.stack([instance_map()] * b))
    return batch


def forward(engine: nn.Module, head: nn.Module, batch: dict):
    x = batch["image"].permute(0, 3, 1, 2).float() / 255.0
    pooled, dense = engine(x)
    return head(pooled, dense, (H, W))


def test_registry_and_config():
    for name in ("segmentation", "classification", "detection", "instance", "ssl"):
        assert build_task({"name": name}).config.name == name
        assert type(build_task({"name": name})) is TASKS.get(name)
    assert {"segmentation", "ssl"} <= set(TASKS.names())
    with pytest.raises(RegistryError, match="known: classification, detection"):
        build_task({"name": "segmentaton"})
    with pytest.raises(pydantic.ValidationError):
        task_config({"name": "ssl", "nmae": "ssl"})
    with pytest.raises(pydantic.ValidationError):  # each task has only its own fields
        task_config({"name": "detection", "dice_weight": 1.0})


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("segmentation", (2, 5, H, W)),
        ("classification", (2, 5)),
        ("detection", (2, 3, H, W)),
        ("instance", (2, 2, H, W)),
        ("ssl", (2, 64)),
    ],
)
def test_head_shapes(name, shape):
    engine = TinyEngine()
    task = build_task({"name": name, **({"out_dim": 64} if name == "ssl" else {})})
    head = task.build_head(engine.embed_dim, engine.dense_channels)
    assert forward(engine, head, make_batch(name)).shape == shape


@pytest.mark.parametrize("name", ["segmentation", "classification", "detection", "instance"])
def test_loss_overfits_a_fixed_batch(name):
    torch.manual_seed(0)
    engine = TinyEngine()
    task = build_task({"name": name})
    head = task.build_head(engine.embed_dim, engine.dense_channels)
    batch = make_batch(name)
    opt = torch.optim.Adam([*engine.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for step in range(20):
        loss = task.loss(forward(engine, head, batch), batch, progress=step / 20)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses
    metric = task.metrics()
    with torch.no_grad():
        metric.update(forward(engine, head, batch), batch)
    assert all(type(v) is float for v in metric.compute().values())


def test_segmentation_perfect_logits_score_one():
    task = build_task({"name": "segmentation"})
    batch = make_batch("segmentation")
    logits = torch.nn.functional.one_hot(batch["target"].long(), 5).permute(0, 3, 1, 2).float() * 10
    metric = task.metrics()
    metric.update(logits, batch)
    out = metric.compute()
    assert out["macro_f1"] == out["dice"] == out["f1/G5"] == 1.0
    np.testing.assert_array_equal(task.predict(logits), batch["target"].numpy())


def test_points_to_heatmap_to_peaks_recovers_points():
    pts = torch.tensor([[[5.5, 7.5, 0], [20.5, 10.5, 1], [12.5, 25.5, 2], [26.5, 26.5, 0], [-1, -1, -1]]])
    heat = render_heatmaps(pts, torch.tensor([0.5], dtype=torch.float64), 3, (H, W), sigma_um=2.0)
    assert heat.shape == (1, 3, H, W) and heat.max() == 1.0
    assert heat[0, 0, 7, 5] == 1.0 and heat[0, 0, 7, 9] == pytest.approx(np.exp(-16 / 32))  # sigma 4 px
    (found,) = decode_points(heat, threshold=0.3)
    order = np.lexsort((found[:, 1], found[:, 0]))
    np.testing.assert_array_equal(found[order, :3], pts[0, :4][np.lexsort((pts[0, :4, 1], pts[0, :4, 0]))])
    # an off-centre point decodes to the centre of its pixel; sigma in px follows mpp
    wide = render_heatmaps(torch.tensor([[[5.2, 7.9, 1]]]), torch.tensor([0.25]), 3, (H, W), sigma_um=2.0)
    assert wide[0, 1, 7, 13] == pytest.approx(np.exp(-64 / 128))  # 8 px sigma at 0.25 µm/px
    np.testing.assert_array_equal(decode_points(wide, 0.3)[0][:, :3], [[5.5, 7.5, 1]])


def test_detection_f1_with_matching_radius_in_um():
    metric = DetectionMetric(["Stromal", "Epithelial", "Tumor"], radius_um=4.0, threshold=0.3)
    true = np.array([[[10, 10, 0], [30, 30, 0], [50, 50, 1], [-1, -1, -1]]], np.float32)
    pred = [np.array([[11, 10, 0, 0.9], [12, 10, 0, 0.8], [50, 52, 0, 0.7]], np.float32)]
    metric.update_points(pred, true, [0.5])
    out = metric.compute()  # class 0: 1 tp of 3 pred, 2 true; class 1: 0 of 0 pred, 1 true
    assert out["f1/Stromal"] == pytest.approx(2 / 5) and out["f1/Epithelial"] == 0.0
    assert out["f1"] == pytest.approx(2 / 6) and out["precision"] == pytest.approx(1 / 3)
    # 6 px apart: a match at 0.5 µm/px (radius 8 px), not at 1 µm/px (radius 4 px)
    for mpp, expected in ((0.5, 1.0), (1.0, 0.0)):
        m = DetectionMetric(["a"], radius_um=4.0, threshold=0.3)
        m.update_points([np.array([[16, 10, 0, 1]], np.float32)], np.array([[[10, 10, 0]]]), [mpp])
        assert m.compute()["f1"] == expected


def test_detection_perfect_heatmap_scores_one():
    task = build_task({"name": "detection"})
    batch = make_batch("detection")
    target = task.heatmaps(batch, (H, W))
    logits = torch.logit(target.clamp(1e-4, 1 - 1e-4))
    metric = task.metrics()
    metric.update(logits, batch)
    assert metric.compute()["f1"] == 1.0
    assert len(task.predict(logits)[0]) == 3


def test_distance_target_by_hand():
    m = np.zeros((7, 7), np.int32)
    m[1:6, 1:6] = 4  # one 5x5 instance (ids need not be 1..k)
    d = distance_target(m)
    assert d[3, 3] == 1.0 and d[1, 1] == pytest.approx(1 / 3) and d[0, 0] == 0.0


def perfect_outputs(maps: np.ndarray) -> torch.Tensor:
    fg, dist = instance_targets(torch.from_numpy(maps))
    return torch.stack([(fg * 2 - 1) * 20, torch.logit(dist.clamp(1e-6, 1 - 1e-6))], 1)


def test_instance_perfect_outputs_reproduce_instances():
    maps = instance_map()[None]
    task = build_task({"name": "instance"})
    pred = task.predict(perfect_outputs(maps))
    np.testing.assert_array_equal(pred, maps)  # same ids here: markers are numbered in raster order
    metric = task.metrics()
    metric.update(perfect_outputs(maps), {"target": torch.from_numpy(maps)})
    assert metric.compute() == {"f1": 1.0, "pq": 1.0, "sq": 1.0}


def test_instance_touching_instances_are_separated():
    m = np.zeros((1, H, W), np.int32)
    m[0, 4:14, 4:14], m[0, 4:14, 14:24], m[0, 20:28, 4:28] = 1, 2, 3
    pred = build_task({"name": "instance"}).predict(perfect_outputs(m))
    assert len(np.unique(pred)) == 4
    tp, fp, fn, iou = instance_counts(m[0], pred[0])
    assert (tp, fp, fn) == (3, 0, 0) and iou / 3 > 0.9


def test_instance_partial_overlap_f1_and_pq():
    true = np.zeros((H, W), np.int32)
    true[2:12, 2:12], true[16:26, 2:12] = 1, 2
    pred = np.zeros_like(true)
    pred[2:12, 4:14] = 5  # 80 / 120 px: IoU 2/3, a match
    pred[16:26, 8:18] = 9  # 40 / 160 px: IoU 1/4, a miss and a false positive
    assert instance_counts(true, pred) == (1, 1, 1, pytest.approx(2 / 3))
    metric = InstanceMetric()
    metric.update_maps(pred[None], torch.from_numpy(true[None]))
    out = metric.compute()
    assert out["f1"] == pytest.approx(0.5) and out["pq"] == pytest.approx((2 / 3) / 2)


def test_postprocess_keeps_unmarked_blobs_and_drops_background():
    fg = np.zeros((H, W))
    fg[5:10, 5:10] = 1.0
    dist = np.zeros((H, W))  # no markers at all: the blob still becomes one instance
    out = postprocess_instances(fg, dist)
    assert out.max() == 1 and (out > 0).sum() == 25
