"""Example-based non-natural classification on embeddings: pure numpy/torch, no Ray.

A user describes unwanted content by example: a few dozen images per category (drawings,
maps, charts, text pages, herbarium sheets, ...) and, optionally, natural (wanted) examples.

* Method A (the reference): per category, the minimum cosine distance of an image to the
  category's examples; an image is that category when the distance is below the category's
  threshold.
* Method B: a class-balanced multinomial logistic regression (linear probe) over
  natural-vs-categories on the embeddings, with probabilities.

Thresholds come from data: with natural examples, each category's threshold is the
``target_frr`` quantile of the natural examples' distances to it (method A) or of their
probability for it (method B), so about ``target_frr`` of natural images are rejected;
k-fold cross-validation estimates recall per category and the natural false-rejection
rate, each with a 95% Wilson interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def min_cosine_distance(x: np.ndarray, bank: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each row of ``x``, 1 - max cosine similarity to the rows of ``bank``."""
    x, bank = normalize(x), normalize(bank)
    out = np.empty(len(x), dtype=np.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = 1.0 - (x[i : i + chunk] @ bank.T).max(axis=1)
    return out


def loo_min_distance(bank: np.ndarray) -> np.ndarray:
    """Leave-one-out: each example's min cosine distance to the *other* examples."""
    b = normalize(bank)
    sim = b @ b.T
    np.fill_diagonal(sim, -np.inf)
    return (1.0 - sim.max(axis=1)).astype(np.float32)


# --------------------------------------------------------------------------- method B

@dataclass
class Probe:
    """A fitted linear probe: classes[0] is 'natural' when natural examples were given."""

    classes: list[str]
    weight: np.ndarray  # (dim, n_classes)
    bias: np.ndarray  # (n_classes,)

    def proba(self, x: np.ndarray) -> np.ndarray:
        logits = normalize(x) @ self.weight + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def fit_probe(x: np.ndarray, labels: list[str], l2: float = 1e-3, seed: int = 0) -> Probe:
    """Class-balanced multinomial logistic regression on L2-normalized embeddings (LBFGS)."""
    classes = sorted(set(labels), key=lambda c: (c != "natural", c))
    y = torch.tensor([classes.index(c) for c in labels])
    counts = torch.bincount(y, minlength=len(classes)).float()
    sample_w = (len(y) / (len(classes) * counts))[y]
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(normalize(x))
    w = (torch.randn(xt.shape[1], len(classes), generator=g) * 0.01).requires_grad_()
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(xt @ w * 10 + b, y, reduction="none") * sample_w).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(classes, (w.detach() * 10).numpy(), b.detach().numpy())


def probe_with_threshold(bank: dict[str, np.ndarray], target_frr: float, k: int = 5,
                         seed: int = 0) -> tuple[Probe, float]:
    """Fit the probe on the whole bank, and its rejection threshold from *out-of-fold*
    natural probabilities (a natural example's probability from a probe that never saw it:
    on its own training examples a probe is overconfident, and a threshold set there
    rejects far more new natural images than ``target_frr``)."""
    names = list(bank)
    x = np.concatenate([bank[c] for c in names])
    y = [c for c in names for _ in range(len(bank[c]))]
    probe = fit_probe(x, y, seed=seed)
    cats = [c for c in probe.classes if c != "natural"]
    nat = bank.get("natural")
    if nat is None or len(nat) < 2:
        return probe, 0.5
    fold = folds(len(nat), min(k, len(nat)), seed)
    oof = np.empty(len(nat), dtype=np.float32)
    for f in np.unique(fold):
        sub = {**bank, "natural": nat[fold != f]}
        xs = np.concatenate([sub[c] for c in names])
        ys = [c for c in names for _ in range(len(sub[c]))]
        p = fit_probe(xs, ys, seed=seed)
        oof[fold == f] = p.proba(nat[fold == f])[:, [p.classes.index(c) for c in cats]].max(axis=1)
    return probe, probability_threshold(oof, target_frr)


# --------------------------------------------------------------------------- thresholds

def distance_threshold(natural_dist: np.ndarray, target_frr: float) -> float:
    """The distance below which about ``target_frr`` of natural images fall (reject < t)."""
    if len(natural_dist) == 0:
        return 0.0
    return float(np.quantile(natural_dist, target_frr, method="lower"))


def probability_threshold(natural_p: np.ndarray, target_frr: float) -> float:
    """The probability above which about ``target_frr`` of natural images fall (reject > t)."""
    if len(natural_p) == 0:
        return 1.0
    return float(np.quantile(natural_p, 1.0 - target_frr, method="higher"))


def folds(n: int, k: int, seed: int) -> np.ndarray:
    """Fold index per item, balanced, deterministic for a seed."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % k
    return out


def predict_min_distance(x: np.ndarray, bank: dict[str, np.ndarray], thresholds: dict[str, float],
                         cats: list[str]) -> np.ndarray:
    """Method A: per row the index in ``cats`` of the category whose threshold the row is
    deepest inside, or -1 (kept)."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    margin = np.stack([min_cosine_distance(x, bank[c]) - thresholds[c] for c in cats], axis=1)
    best = margin.argmin(axis=1)
    return np.where(margin[np.arange(len(x)), best] < 0, best, -1)


def predict_probe(x: np.ndarray, probe: Probe, threshold: float, cats: list[str]) -> np.ndarray:
    """Method B: index in ``cats`` of the most probable unwanted class when its probability
    is above ``threshold``, else -1."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    pu = probe.proba(x)[:, [probe.classes.index(c) for c in cats]]
    best = pu.argmax(axis=1)
    return np.where(pu.max(axis=1) > threshold, best, -1)


def cross_validate(bank: dict[str, np.ndarray], target_frr: float, k: int = 5, seed: int = 0) -> dict:
    """k-fold estimates for both methods, each proportion with its 95% Wilson interval:

    * per category ``recall`` (held-out examples of the category rejected, as it or as any
      other unwanted category) and ``precision`` (held-out items predicted as the category
      that are that category; this depends on the bank's mix of categories and naturals);
    * overall recall, and the natural false-rejection rate (held-out natural examples
      rejected) with the share each category takes of those false rejections.

    ``bank`` maps category -> embeddings and may hold 'natural'."""
    cats = [c for c in sorted(bank) if c != "natural"]
    classes = [*cats, "natural"]
    fold_of = {c: folds(len(bank[c]), min(k, max(2, len(bank[c]))), seed) for c in classes if c in bank}
    # confusion[m][true class][predicted category index or -1]
    confusion = {m: {t: np.zeros(len(cats) + 1, np.int64) for t in classes} for m in ("A", "B")}
    for f in range(k):
        train = {c: bank[c][fold_of[c] != f] for c in fold_of}
        test = {c: bank[c][fold_of[c] == f] for c in fold_of}
        if any(len(train[c]) == 0 for c in cats):
            continue
        nat_train = train.get("natural", bank[cats[0]][:0])
        # method A: thresholds from training naturals, applied to held-out items
        thr = {c: distance_threshold(min_cosine_distance(nat_train, train[c]), target_frr) for c in cats}
        # method B: a probe on the training split, its threshold from out-of-fold naturals
        probe, pthr = probe_with_threshold(train, target_frr, k=k, seed=seed)
        for m, predict in (("A", lambda x: predict_min_distance(x, train, thr, cats)),
                           ("B", lambda x: predict_probe(x, probe, pthr, cats))):
            for t in test:
                confusion[m][t] += np.bincount(predict(test[t]) + 1, minlength=len(cats) + 1)[
                    np.r_[1 : len(cats) + 1, 0]]
    out = {}
    for m in ("A", "B"):
        cm = confusion[m]
        per = {}
        for i, c in enumerate(cats):
            n = int(cm[c].sum())
            hit = n - int(cm[c][-1])
            predicted = int(sum(cm[t][i] for t in classes))
            per[c] = {"recall": hit / n if n else None, "n": n, "ci95": wilson(hit, n),
                      "precision": int(cm[c][i]) / predicted if predicted else None, "n_predicted": predicted,
                      "precision_ci95": wilson(int(cm[c][i]), predicted) if predicted else None,
                      "natural_false_rejections": int(cm["natural"][i])}
        all_n = sum(int(cm[c].sum()) for c in cats)
        all_k = all_n - sum(int(cm[c][-1]) for c in cats)
        nat_n = int(cm["natural"].sum())
        nat_k = nat_n - int(cm["natural"][-1])
        out[m] = {"categories": per, "recall": all_k / all_n if all_n else None, "recall_ci95": wilson(all_k, all_n),
                  "natural_frr": nat_k / nat_n if nat_n else None, "natural_n": nat_n,
                  "natural_frr_ci95": wilson(nat_k, nat_n) if nat_n else None}
    return out
