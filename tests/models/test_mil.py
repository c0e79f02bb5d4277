"""Slide-level models (no Ray): ABMIL and mean-pool shapes, attention over masked bags, the k-fold
assignment (grouped by case, stratified by label), slide scores and the heatmap outputs."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pathray.models.mil import ABMIL, MeanPool, build_mil_model, pad_bags
from pathray.registry import MIL_MODELS, RegistryError


@pytest.mark.parametrize("name", MIL_MODELS.names())
def test_every_registered_model_maps_bags_to_logits_and_attention(name):
    model = build_mil_model(name, in_dim=16, n_classes=3, hidden=8).eval()
    out = model(torch.randn(4, 10, 16))
    assert out.logits.shape == (4, 3) and out.attention.shape == (4, 10)
    assert torch.allclose(out.attention.sum(1), torch.ones(4), atol=1e-5)


def test_the_registry_knows_both_models_and_names_them_on_a_typo():
    assert {"abmil", "meanpool"} <= set(MIL_MODELS.names())
    assert isinstance(build_mil_model("abmil", 8, 2), ABMIL)
    assert isinstance(build_mil_model("meanpool", 8, 2), MeanPool)
    with pytest.raises(RegistryError, match="abmil"):
        build_mil_model("abmill", 8, 2)


@pytest.mark.parametrize("name", ["abmil", "meanpool"])
def test_padding_gets_no_attention_and_does_not_change_a_bag(name):
    torch.manual_seed(0)
    model = build_mil_model(name, in_dim=12, n_classes=4, hidden=8).eval()
    bags = [torch.randn(n, 12) for n in (3, 7, 1)]
    x, mask = pad_bags(bags)
    assert x.shape == (3, 7, 12) and mask.sum(1).tolist() == [3, 7, 1]
    x[~mask] = 1e3  # whatever the padding holds
    out = model(x, mask)
    assert torch.all(out.attention[~mask] == 0)
    assert torch.allclose(out.attention.sum(1), torch.ones(3), atol=1e-5)
    for i, bag in enumerate(bags):  # each bag alone gives the same slide output
        alone = model(bag[None])
        assert torch.allclose(alone.logits[0], out.logits[i], atol=1e-5)
        assert torch.allclose(alone.attention[0], out.attention[i, : len(bag)], atol=1e-6)


def test_abmil_attention_follows_its_gated_scores_and_meanpool_is_uniform():
    torch.manual_seed(0)
    abmil = ABMIL(6, 2, hidden=4, dropout=0.0).eval()
    x = torch.randn(1, 5, 6)
    h = abmil.encode(x)
    gate = abmil.attend
    scores = gate.w(torch.tanh(gate.v(h)) * torch.sigmoid(gate.u(h))).squeeze(-1)
    assert torch.allclose(abmil(x).attention, scores.softmax(-1), atol=1e-6)
    assert torch.allclose(MeanPool(6, 2).eval()(x).attention, torch.full((1, 5), 0.2))


def test_inputs_are_standardised_with_the_statistics_the_model_carries():
    model = MeanPool(3, 2, dropout=0.0).eval()
    x = torch.tensor([[[1.0, 2.0, 3.0]]])
    before = model(x).logits
    model.set_input_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 2.0]))
    assert torch.allclose(model(x).logits, model.classify[1].bias[None])  # (x - mean) / std = 0
    assert not torch.allclose(before, model(x).logits)
    assert set(model.state_dict()) >= {"input_mean", "input_std"}  # saved with the weights


def test_bags_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        build_mil_model("abmil", 8, 2)(torch.randn(2, 3, 5))


def test_folds_keep_cases_whole_and_spread_every_label():
    from pathray.datasets.splits import fold_manifest

    rng = np.random.default_rng(0)
    rows = []
    for case in range(40):  # 40 cases of 1-3 slides, labels 50/30/20 %
        label = rng.choice(["A", "B", "C"], p=[0.5, 0.3, 0.2])
        rows += [
            {"slide_id": f"s{case}-{i}", "case_id": f"c{case}", "label": label} for i in range(1 + case % 3)
        ]
    frame = fold_manifest(pd.DataFrame(rows), k=5, seed=3)
    assert sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]
    assert frame.groupby("case_id")["fold"].nunique().max() == 1  # no case in two folds
    for label, group in frame.groupby("label"):
        per_fold = group["fold"].value_counts().reindex(range(5), fill_value=0)
        share = len(group) / 5
        assert (per_fold - share).abs().max() <= 2.5, (label, per_fold.tolist())  # off by < ~1 case
    assert fold_manifest(pd.DataFrame(rows), k=5, seed=3)["fold"].tolist() == frame["fold"].tolist()


def test_folds_of_single_slide_cases_are_balanced_exactly():
    from pathray.datasets.splits import grouped_folds

    labels = ["A"] * 12 + ["B"] * 8 + ["C"] * 4
    folds = grouped_folds(labels, list(range(len(labels))), k=4, seed=1)
    counts = collections.Counter(zip(labels, folds, strict=True))
    assert {counts[("A", f)] for f in range(4)} == {3}
    assert {counts[("B", f)] for f in range(4)} == {2}
    assert {counts[("C", f)] for f in range(4)} == {1}
    with pytest.raises(ValueError, match="at least 2"):
        grouped_folds(labels, labels, k=1)


def test_slide_scores_auroc_matches_its_definition():
    from pathray.models.metrics import binary_auroc, macro_auroc, slide_scores

    assert binary_auroc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert binary_auroc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties: half
    assert binary_auroc(np.array([1, 0, 0]), np.array([0.3, 0.6, 0.1])) == 0.5  # beats 1 of 2 negatives
    assert math.isnan(binary_auroc(np.array([1, 1]), np.array([0.1, 0.2])))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    assert macro_auroc(np.array([0, 1, 2, 0]), probs) == 1.0
    p1 = np.array([0.1, 0.8, 0.3, 0.6])
    binary = np.stack([1 - p1, p1], 1)
    assert macro_auroc(np.array([0, 1, 0, 1]), binary) == 1.0  # two classes: the ordinary AUROC
    assert macro_auroc(np.array([1, 0, 0, 1]), binary) == binary_auroc(np.array([1, 0, 0, 1]), p1) == 0.25
    constant = slide_scores(np.array([0, 0, 1, 2]), np.tile([0.5, 0.25, 0.25], (4, 1)))
    assert constant == {
        "balanced_accuracy": pytest.approx(1 / 3),
        "macro_f1": pytest.approx(2 / 9),
        "auroc": 0.5,
    }


def test_heatmaps_paint_each_tile_on_its_grid_cell_and_the_geojson_carries_attention():
    import io

    from PIL import Image

    from pathray.training.mil_outputs import attention_grid, grid_step, heatmap_geojson, heatmap_png

    x, y = np.array([0, 448, 448, 896]), np.array([0, 0, 448, 448])
    attention = np.array([0.1, 0.2, 0.3, 0.4])
    step = grid_step(x, y, fallback=256)
    assert step == 448 and grid_step(np.array([64]), np.array([64]), 256) == 256
    grid = attention_grid(x, y, attention, step)
    assert grid.shape == (2, 3) and grid[1, 2] == 1.0 and grid[0, 1] == 0.5 and np.isnan(grid[1, 0])
    image = Image.open(io.BytesIO(heatmap_png(x, y, attention, step, longest=300)))
    assert image.size == (300, 200)  # 3 x 2 cells, 100 px each
    doc = json.loads(json.dumps(heatmap_geojson(x, y, attention, step, {"slide_id": "s"})))
    assert doc["type"] == "FeatureCollection" and doc["properties"]["slide_id"] == "s"
    ring = doc["features"][3]["geometry"]["coordinates"][0]
    assert ring[0] == [896, 448] and ring[2] == [1344, 896]
    assert [f["properties"]["measurements"]["attention"] for f in doc["features"]] == pytest.approx(attention)
