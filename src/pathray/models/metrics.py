"""Metrics: confusion-matrix F1/Dice, mergeable accumulators and label-free representation metrics."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class MetricAccumulator(Protocol):
    """Sums over batches (and processes): ``update`` per batch, ``compute`` at the end.

    ``state()`` is a dict of numpy arrays that another process's accumulator can ``merge``, so a
    distributed validation gathers every worker's state (any all-gather will do) and merges them.
    """

    def update(self, outputs: Any, batch: dict[str, Any]) -> None: ...
    def compute(self) -> dict[str, float]: ...
    def state(self) -> dict[str, np.ndarray]: ...
    def merge(self, state: dict[str, np.ndarray]) -> None: ...


class CountAccumulator:
    """An accumulator whose state is arrays of counts: merging two is adding them."""

    def __init__(self, **counts: np.ndarray) -> None:
        self.counts = {k: np.asarray(v, np.float64).copy() for k, v in counts.items()}

    def add(self, **counts: Any) -> None:
        for key, value in counts.items():
            self.counts[key] += np.asarray(value, np.float64)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.counts.items()}

    def merge(self, state: dict[str, np.ndarray]) -> None:
        self.add(**state)


def confusion_matrix(target: Tensor, pred: Tensor, n: int) -> np.ndarray:
    """``(n, n)`` counts, rows true class, columns predicted; labels outside ``0..n-1`` are ignored."""
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t >= 0) & (t < n) & (p >= 0) & (p < n)
    counts = torch.bincount(t[keep] * n + p[keep], minlength=n * n)
    return counts.reshape(n, n).cpu().numpy().astype(np.float64)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """``2TP / (2TP + FP + FN)`` per class (0 where a class is in neither targets nor predictions).

    Over pixels this is also each class's Dice coefficient.
    """
    tp = np.diag(cm)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)


def macro_f1(cm: np.ndarray, exclude: tuple[int, ...] = ()) -> float:
    """Mean F1 over classes present in targets or predictions, leaving out ``exclude``.

    A class absent from both has no F1 to speak of (counting it as 0 or 1 would only dilute the
    mean), so it is skipped; NaN when no class is left.
    """
    present = (cm.sum(0) + cm.sum(1)) > 0
    present[list(exclude)] = False
    return float(f1_per_class(cm)[present].mean()) if present.any() else math.nan


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the targets (scikit-learn's definition)."""
    support = cm.sum(1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else math.nan


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative (ties
    count half), by the Mann-Whitney rank sum. NaN without both positives and negatives."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool).reshape(-1)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(scores, np.float64).reshape(-1))  # ties: average ranks
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(target: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes present in ``target`` (``probs``: ``(N, C)``).

    With two classes this is the ordinary AUROC. A class that is absent from the targets has no
    ROC curve and is left out (with one class present, no class has both positives and negatives:
    NaN).
    """
    target = np.asarray(target).reshape(-1)
    probs = np.asarray(probs, np.float64).reshape(len(target), -1)
    scores = [binary_auroc(target == c, probs[:, c]) for c in range(probs.shape[1])]
    present = [s for s in scores if not math.isnan(s)]
    return float(np.mean(present)) if present else math.nan


def slide_scores(target: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``balanced_accuracy``, ``macro_f1`` and ``auroc`` (one-vs-rest macro) of class probabilities
    ``(N, C)`` against integer targets: what a slide-level model is judged by."""
    target = np.asarray(target).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, np.float64).reshape(len(target), -1)
    cm = confusion_matrix(torch.from_numpy(target), torch.from_numpy(probs.argmax(1)), probs.shape[1])
    return {
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "auroc": macro_auroc(target, probs),
    }


def foreground_dice(cm: np.ndarray, background: int = 0) -> float:
    """Dice of "any foreground class" against ``background``, whatever the class: tissue found."""
    fg = np.ones(len(cm), bool)
    fg[background] = False
    tp, pred, true = cm[np.ix_(fg, fg)].sum(), cm[:, fg].sum(), cm[fg].sum()
    return float(2 * tp / (pred + true)) if pred + true > 0 else math.nan


def class_report(cm: np.ndarray, classes: list[str], exclude: tuple[int, ...] = ()) -> dict[str, float]:
    """``f1/<class>`` per class, ``macro_f1``, ``balanced_accuracy`` and ``accuracy`` from one matrix.

    A class in neither targets nor predictions gets NaN, not 0: nothing was scored for it.
    """
    present = (cm.sum(0) + cm.sum(1)) > 0
    f1 = np.where(present, f1_per_class(cm), np.nan)
    out = {f"f1/{name}": float(v) for name, v in zip(classes, f1, strict=True)}
    out["macro_f1"] = macro_f1(cm, exclude)
    out["balanced_accuracy"] = balanced_accuracy(cm)
    out["accuracy"] = float(np.trace(cm) / cm.sum()) if cm.sum() else math.nan
    return out


def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): ``exp(H(p))``, ``p_k = σ_k / Σσ + eps`` over singular values.

    An effective rank between 1 (collapse onto a line) and ``min(N, D)`` (spread evenly): a
    collapsing SSL run shows here long before any label does.
    """
    s = torch.linalg.svdvals(embeddings.detach().double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def odcorr(embeddings: Tensor) -> float:
    """Mean absolute off-diagonal Pearson correlation between the D features over N samples.

    ``C = corr(X)`` (features standardised over the batch), ``ODCorr = Σ_{i≠j} |C_ij| / (D(D-1))``;
    features with zero variance are left out (their correlation is undefined). 0: decorrelated
    features, 1: every feature a copy of the others (redundant, partly collapsed).
    """
    x = embeddings.detach().double()
    x = x - x.mean(0)
    std = x.pow(2).mean(0).sqrt()
    x = x[:, std > 1e-12] / std[std > 1e-12]
    d = x.shape[1]
    if d < 2:
        return math.nan
    corr = (x.T @ x) / x.shape[0]
    return float((corr.abs().sum() - corr.diagonal().abs().sum()) / (d * (d - 1)))


def probe_report(target: Tensor, pred: Tensor, n_classes: int) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy`` and ``macro_f1`` of a probe's predictions (eva's three)."""
    cm = confusion_matrix(target, pred, n_classes)
    accuracy = float(np.trace(cm) / cm.sum()) if cm.sum() else math.nan
    return {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy(cm), "macro_f1": macro_f1(cm)}


def logistic_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    seed: int = 0,
    steps: int = 1000,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
) -> dict[str, float]:
    """A linear layer trained with cross-entropy (AdamW, shuffled mini-batches, cosine decay), as
    eva's linear probe: ``probe_report`` scores on the test set.

    ``seed`` sets the layer's initialisation and the shuffling, so repeating a comparison over seeds
    measures how much the score owes to them. Features are standardised with the training
    statistics; a fixed number of ``steps`` (not epochs) lets a few hundred tiles converge too.
    """
    generator = torch.Generator().manual_seed(seed)
    xtr, xte = train_x.detach().float(), test_x.detach().float()
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr, yte = train_y.long().reshape(-1), test_y.long().reshape(-1)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    layer = torch.nn.Linear(xtr.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    batches: list[Tensor] = []
    with torch.enable_grad():
        for _ in range(steps):
            if not batches:
                batches = list(torch.randperm(len(xtr), generator=generator).split(batch_size))
            idx = batches.pop()
            loss = torch.nn.functional.cross_entropy(layer(xtr[idx]), ytr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return probe_report(yte, layer(xte).argmax(1), n_classes)


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ridge: float = 1e-3
) -> dict[str, float]:
    """Closed-form ridge regression onto one-hot labels: ``probe_report`` scores on the test set.

    Deterministic and without hyperparameters to tune, so two checkpoints compare on features alone.
    Features are standardised with the training statistics; ``ridge`` is relative to ``N``.
    """
    xtr, xte = train_x.detach().double(), test_x.detach().double()
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-8)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ones = torch.ones(len(xtr), 1, dtype=xtr.dtype)
    xtr = torch.cat([xtr, ones], 1)
    xte = torch.cat([xte, torch.ones(len(xte), 1, dtype=xte.dtype)], 1)
    ytr, yte = train_y.long().reshape(-1), test_y.long().reshape(-1)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    onehot = torch.nn.functional.one_hot(ytr, n_classes).double()
    gram = xtr.T @ xtr + ridge * len(xtr) * torch.eye(xtr.shape[1], dtype=xtr.dtype)
    weights = torch.linalg.solve(gram, xtr.T @ onehot)
    return probe_report(yte, (xte @ weights).argmax(1), n_classes)


def knn_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20, temperature: float = 0.07
) -> dict[str, float]:
    """DINO's weighted k-NN classifier: cosine similarity to the ``k`` nearest training embeddings,
    each voting for its label with weight ``exp(sim / temperature)``: ``probe_report`` scores."""
    xtr = torch.nn.functional.normalize(train_x.detach().double(), dim=1)
    xte = torch.nn.functional.normalize(test_x.detach().double(), dim=1)
    ytr, yte = train_y.long().reshape(-1), test_y.long().reshape(-1)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    sims, idx = (xte @ xtr.T).topk(min(k, len(xtr)), dim=1)
    votes = torch.zeros(len(xte), n_classes, dtype=torch.float64)
    votes.scatter_add_(1, ytr[idx], (sims / temperature).exp())
    return probe_report(yte, votes.argmax(1), n_classes)


def ssl_scores(embeddings: Tensor, labels: Tensor, groups: list[str]) -> dict[str, float]:
    """What an SSL run is watched by, on a fixed held-out tile set: ``rankme`` and ``odcorr`` of the
    embeddings, and ``knn_acc`` / ``linear_acc`` of probes fitted on half of the slides (every other
    one, sorted) and scored on the rest (every other tile when all come from one slide). Probe
    scores are NaN when the labels leave nothing to tell apart."""
    scores = {"rankme": rankme(embeddings), "odcorr": odcorr(embeddings)}
    names = sorted(set(groups))
    if len(names) >= 2:
        fit_groups = set(names[::2])
        fit = torch.tensor([g in fit_groups for g in groups])
    else:
        fit = torch.arange(len(groups)) % 2 == 0
    y = labels.long().reshape(-1)
    if fit.any() and (~fit).any() and len(set(y[fit].tolist())) > 1:
        knn = knn_probe(embeddings[fit], y[fit], embeddings[~fit], y[~fit])
        linear = linear_probe(embeddings[fit], y[fit], embeddings[~fit], y[~fit])
        scores |= {"knn_acc": knn["accuracy"], "linear_acc": linear["accuracy"]}
    else:
        scores |= {"knn_acc": math.nan, "linear_acc": math.nan}
    return scores


class EmbeddingMetric:
    """Collects teacher embeddings (up to ``max_samples``) for ``rankme`` and ``odcorr``."""

    def __init__(self, max_samples: int = 8192) -> None:
        self.max_samples = max_samples
        self.parts: list[np.ndarray] = []
        self.losses: dict[str, list[float]] = {}  # an SSL step's loss parts ("loss/dino", ...), averaged

    @torch.no_grad()
    def update(self, outputs: dict[str, Any] | Tensor, batch: dict[str, Any] | None = None) -> None:
        """``outputs``: embeddings, or a dict with ``embedding`` (else the first ``teacher`` view)."""
        if isinstance(outputs, Tensor):
            emb = outputs
        else:
            emb = outputs["embedding"] if "embedding" in outputs else outputs["teacher"][0]
            for name, value in outputs.get("losses", {}).items():
                self.losses.setdefault(name, []).append(float(value))
        self.merge({"embeddings": emb.detach().float().cpu().numpy()})

    def state(self) -> dict[str, np.ndarray]:
        return {"embeddings": np.concatenate(self.parts) if self.parts else np.zeros((0, 0), np.float32)}

    def merge(self, state: dict[str, np.ndarray]) -> None:
        have = sum(len(p) for p in self.parts)
        if len(state["embeddings"]) and have < self.max_samples:
            self.parts.append(state["embeddings"][: self.max_samples - have])

    def compute(self) -> dict[str, float]:
        x = torch.from_numpy(self.state()["embeddings"])
        losses = {name: float(np.mean(values)) for name, values in self.losses.items()}
        if len(x) < 2:
            return {"rankme": math.nan, "odcorr": math.nan, **losses}
        return {"rankme": rankme(x), "odcorr": odcorr(x), **losses}
