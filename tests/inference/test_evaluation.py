"""Whole-slide evaluation: the serving predictor over every annotated region, bootstrap intervals.

A real model (the debug engine) whose segmentation head is set to answer one class everywhere
makes the expected counts computable from the annotations alone; a region annotated on glass,
where the tissue mask finds nothing, must still be evaluated (coverage 1.0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pathray.inference.config import InferenceConfig
from pathray.inference.evaluation import bootstrap, evaluate_slides, score_slide
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.models.heads import ConfusionMetric
from pathray.wsi.annotations.geometry import rasterize
from pathray.wsi.annotations.targets import AnnotationIndex
from pathray.wsi.backends.open import open_slide
from pathray.wsi.patching.tissue import tissue_mask

CLASSES = ["Background", "Benign", "G3", "G4", "G5"]
TILE, MPP = 64, 2.0


@pytest.fixture(scope="module")
def slide_with_glass_region(tmp_path_factory):
    """A synthetic slide whose annotations gain a G4 square on glass, in a corner no tissue tile
    reaches."""
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("eval")
    (synth,) = write_synthetic_slides(out, n=1, seed=3, config=SynthConfig(size=3072))
    slide = open_slide(synth.path, cache=False)
    mask = tissue_mask(slide)
    assert not mask.mask[:20, :20].any()  # the top-left corner is glass (640 px at 32 px a pixel)
    x0, y0 = 40, 40
    square = [[x0, y0], [x0 + 300, y0], [x0 + 300, y0 + 300], [x0, y0 + 300], [x0, y0]]
    doc = json.loads(synth.annotations_path.read_text())
    doc["features"].append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"objectType": "annotation", "classification": {"name": "G4"}},
        }
    )
    synth.annotations_path.write_text(json.dumps(doc))
    return synth


def constant_model(k: int):
    """A real segmentation model (debug engine) whose head answers class ``k`` at every pixel."""
    from pathray.config import load_config
    from pathray.models.task_model import build_model

    cfg = load_config(None, ["engine.name=debug_cnn"])
    model, spec = build_model(cfg.engine, cfg.task)
    conv = model.head.net if isinstance(model.head.net, torch.nn.Conv2d) else model.head.net[-1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-10.0)
        conv.bias[k] = 10.0
    return model.eval(), spec


def test_every_annotated_pixel_is_scored_with_the_counts_the_annotations_give(slide_with_glass_region):
    synth = slide_with_glass_region
    model, task = constant_model(2)  # "G3" everywhere
    config = InferenceConfig(batch_size=16, chunk_tiles=64, read_threads=1, overlap=0.0)
    predictor = Predictor(model, ModelSpec(task, TILE, MPP, "constant"), config)
    slide = open_slide(synth.path, cache=False)
    index = AnnotationIndex.load(str(synth.annotations_path))
    score = score_slide(predictor, slide, "s", index)
    assert score.covered == score.annotated > 0  # the glass square too: coverage 1.0
    assert score.out_mpp == MPP

    cm = score.state["confusion"]
    assert cm[:, [0, 1, 3, 4]].sum() == 0  # only G3 was predicted
    d = MPP / slide.mpp
    w, h = slide.dimensions
    rows, cols = int(np.ceil(h / d)), int(np.ceil(w / d))
    lookup = {n: i for i, n in enumerate(CLASSES)}
    truth = rasterize([(p, lookup[c]) for p, c in index.regions], 0, 0, d, cols, rows)
    marked = rasterize([(p, 1) for p, _ in index.regions], 0, 0, d, cols, rows).astype(bool)
    # every annotated pixel was scored against its own class, once
    for k in range(1, len(CLASSES)):
        assert cm[k, 2] == (truth == k).sum()
    assert (truth == 3).sum() > 0 and cm[0, 2] > 0  # G4 (the glass square at least) and background
    assert cm.sum() >= marked.sum()

    evaluation = evaluate_slides(
        predictor,
        [{"slide_id": "s", "uri": str(synth.path), "annotations_uri": str(synth.annotations_path)}],
        n_boot=50,
    )
    m = evaluation.metrics
    assert m["test/coverage"] == 1.0 and m["test/slides"] == 1.0
    g3 = 2 * cm[2, 2] / (2 * cm[2, 2] + cm[:, 2].sum() - cm[2, 2] + cm[2].sum() - cm[2, 2])
    assert m["test/f1/G3"] == pytest.approx(g3)
    assert m["test/f1/G4"] == 0.0 and m["test/macro_f1"] == pytest.approx(g3 / 4)
    assert m["test/f1/G3_lo"] == m["test/f1/G3_hi"] == pytest.approx(g3)  # one slide: no spread


def test_the_tissue_mask_alone_would_miss_the_glass_region(slide_with_glass_region):
    """The other side of coverage: planned over tissue only, the glass square gets no tile."""
    from pathray.inference.grid import plan_grid

    synth = slide_with_glass_region
    model, task = constant_model(2)
    spec = ModelSpec(task, TILE, MPP, "constant")
    slide = open_slide(synth.path, cache=False)
    index = AnnotationIndex.load(str(synth.annotations_path))
    config = InferenceConfig(out_mpp=MPP, overlap=0.0)
    tissue_only = plan_grid(slide, spec, config)
    poly = next(p for p, c in index.regions if c == "G4" and p.area <= 300 * 300)
    x0, y0, x1, y1 = poly.bbox
    hit = (
        (tissue_only.xs < x1)
        & (tissue_only.xs + tissue_only.extent > x0)
        & (tissue_only.ys < y1)
        & (tissue_only.ys + tissue_only.extent > y0)
    )
    assert not hit.any()


def confusion_state(correct: int, wrong: int) -> dict[str, np.ndarray]:
    cm = np.zeros((2, 2))
    cm[1, 1], cm[1, 0] = correct, wrong
    return {"confusion": cm}


def test_identical_slides_give_an_interval_of_width_zero():
    states = [confusion_state(30, 10)] * 8
    bounds = bootstrap(states, lambda: ConfusionMetric(["a", "b"]), n=200)
    assert bounds["accuracy"] == (0.75, 0.75)


def test_the_bootstrap_interval_covers_a_known_accuracy_about_95_percent_of_the_time():
    """30 slides of 20 tiles each, every tile right with probability 0.8: the 95 % interval of the
    pooled accuracy holds 0.8 in about 95 % of 200 such studies."""
    rng = np.random.default_rng(7)
    held = 0
    for study in range(200):
        right = rng.binomial(20, 0.8, size=30)
        states = [confusion_state(r, 20 - r) for r in right]
        lo, hi = bootstrap(states, lambda: ConfusionMetric(["a", "b"]), n=200, seed=study)["accuracy"]
        held += lo <= 0.8 <= hi
    assert 0.88 <= held / 200 <= 0.99, held
