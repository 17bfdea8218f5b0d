"""Example-based non-natural classification on embeddings: pure numpy/torch, no Ray.

A user describes unwanted content by example: a few dozen images per category (drawings,
maps, charts, text pages, herbarium sheets, ...) and, optionally, natural (wanted) examples.

* Method A, ``min_distance``: an image's score is its minimum cosine distance to the
  unwanted examples (its category: the one the nearest example belongs to); it is
  rejected below one threshold.
* Method B, ``probe``: a multinomial logistic regression (linear probe) over natural and
  the categories, weighted so that natural and the unwanted classes together weigh the
  same; an image is rejected when its probability of being unwanted (1 - p(natural)) is
  above a threshold, its category the most probable unwanted class. The L2 penalty is
  chosen by inner cross-validation (log-loss of out-of-fold examples).

Thresholds come from out-of-fold scores: a natural example's score from a model that never
saw it or any example of its source (naturals are grouped by source: crops and copies of
one photo, found as near-identical embeddings, are never on both sides of a split). Each
threshold rejects at most ``target_frr`` of those naturals and, when the bank's unwanted
examples lie farther out, moves into the gap (``gap_threshold``: to its middle for the
probe, to the unwanted side for min_distance). The previous min_distance rule -- one
threshold per category, each the ``target_frr`` quantile of the naturals' distances --
rejected several times ``target_frr``: with ~19 naturals per training split each threshold
is about their lowest distance (a new photo falls below it with probability ~1/20), and a
photo is rejected when it falls below any of the categories' (17% cross-validated at a 2%
target on a bank of seven categories, 4/24; 12 of 106 held-out photos).

``cross_validate`` estimates, by k-fold over the bank (naturals folded by source), recall
and precision per category and the natural false-rejection rate of both methods, each with
a 95% Wilson interval, refitting everything (thresholds, the probe's penalty) inside each
fold, and counts the held-out examples only one method gets wrong; ``choose_method``
picks a method from those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Cosine similarity from which two natural examples count as one source (crops, resizes,
#: grey copies of one photo: >= 0.79 with the ImageNet MobileNetV2; distinct photos: 99% of
#: pairs below 0.73, measured on the 65 packaged photos).
SAME_SOURCE_SIMILARITY = 0.8
#: The probe's L2 penalties tried by inner cross-validation.
L2_GRID = (1e-3, 1e-2, 1e-1)
#: A tie goes to the probe only with this many natural examples from this many sources.
PROBE_MIN_NATURAL = 20
PROBE_MIN_SOURCES = 8
#: A category with fewer examples has no recall estimate worth the name.
MIN_CATEGORY_EXAMPLES = 5


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


# --------------------------------------------------------------------------- sources, folds

def natural_groups(x: np.ndarray, min_similarity: float = SAME_SOURCE_SIMILARITY) -> np.ndarray:
    """Source id per row (0, 1, ... in order of first appearance): connected components of
    the rows linked at cosine similarity >= ``min_similarity`` (crops and copies of one
    photo end up in one source)."""
    n = len(x)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n:
        b = normalize(x)
        for i, j in zip(*np.nonzero(np.triu(b @ b.T >= min_similarity, 1))):
            parent[find(int(i))] = find(int(j))
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv].astype(np.int64)  # numbered in order of first row


def folds(n: int, k: int, seed: int) -> np.ndarray:
    """Fold index per item, balanced, deterministic for a seed."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % k
    return out


def group_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item such that every group lies in one fold (groups balanced over folds)."""
    ug, inv = np.unique(groups, return_inverse=True)
    return folds(len(ug), min(k, len(ug)), seed)[inv]


def bank_folds(bank: dict[str, np.ndarray], k: int, seed: int, groups: np.ndarray | None) -> dict[str, np.ndarray]:
    """Fold per example of each class: naturals by source (``groups``), others one by one."""
    out = {c: folds(len(v), min(k, max(2, len(v))), seed) for c, v in bank.items() if c != "natural"}
    if "natural" in bank:
        g = natural_groups(bank["natural"]) if groups is None else np.asarray(groups)
        out["natural"] = group_folds(g, k, seed)
    return out


# --------------------------------------------------------------------------- thresholds

def gap_threshold(natural: np.ndarray, unwanted: np.ndarray, target_frr: float, into_gap: float = 0.5,
                  unwanted_q: float | None = None) -> float:
    """Threshold on a score where higher means unwanted (reject ``score > t``): the lowest
    that rejects at most ``target_frr`` of ``natural`` (out-of-fold scores); when the
    unwanted scores' ``unwanted_q`` quantile (default ``target_frr``) lies above it -- a gap
    the bank can see -- the fraction ``into_gap`` of the way to it (0.5: the middle of the
    gap; 1: the unwanted side)."""
    q = target_frr if unwanted_q is None else unwanted_q
    if len(natural) == 0:
        return float(np.quantile(unwanted, q, method="lower")) if len(unwanted) else 0.0
    t = float(np.quantile(natural, 1.0 - target_frr, method="higher"))
    if len(unwanted):
        u = float(np.quantile(unwanted, q, method="lower"))
        if u > t:
            t += into_gap * (u - t)
    return t


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


# --------------------------------------------------------------------------- method A

def nearest_unwanted(x: np.ndarray, bank: dict[str, np.ndarray], cats: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: min cosine distance to any unwanted example, and the index in ``cats`` of
    the category that example belongs to."""
    d = np.stack([min_cosine_distance(x, bank[c]) for c in cats], axis=1)
    return d.min(axis=1), d.argmin(axis=1)


def min_distance_threshold(bank: dict[str, np.ndarray], target_frr: float) -> float:
    """Method A's one distance threshold (reject ``distance < t``): the largest distance of an
    unwanted example to its nearest other unwanted example (leave one out: as far as a new
    example of a kind the bank shows can be expected to lie), lowered where it would reject
    more than ``target_frr`` of the naturals (their distances to the unwanted examples are
    out of sample: no natural is in the unwanted banks) -- ``gap_threshold`` at the
    unwanted side of the gap. Not its middle: the naturals of a bank are a few photos, and
    how far they happen to lie from the unwanted examples says little about other photos
    (crops of five photos put the middle where it rejected 16 of 180 other photos; the
    unwanted side, none). Not a quantile of the unwanted distances either: of a few dozen
    examples, any quantile short of the largest leaves out kinds the bank has one or two of
    (a 12-chart bank, three of each chart type: its second-largest distance missed a new
    chart)."""
    cats = [c for c in bank if c != "natural"]
    unwanted = []
    for c in cats:
        own = loo_min_distance(bank[c]) if len(bank[c]) > 1 else np.full(len(bank[c]), np.inf, np.float32)
        others = [min_cosine_distance(bank[c], bank[o]) for o in cats if o != c]
        unwanted.append(np.min([own, *others], axis=0))
    unwanted = np.concatenate(unwanted) if unwanted else np.zeros(0, np.float32)
    unwanted = unwanted[np.isfinite(unwanted)]
    natural = bank.get("natural")
    nat = nearest_unwanted(natural, bank, cats)[0] if natural is not None and len(natural) else np.zeros(0)
    return -gap_threshold(-nat, -unwanted, target_frr, into_gap=1.0, unwanted_q=0.0)


def predict_min_distance(x: np.ndarray, bank: dict[str, np.ndarray], thresholds: dict[str, float],
                         cats: list[str]) -> np.ndarray:
    """Method A: per row the index in ``cats`` of the category whose threshold the row is
    deepest inside, or -1 (kept)."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    margin = np.stack([min_cosine_distance(x, bank[c]) - thresholds[c] for c in cats], axis=1)
    best = margin.argmin(axis=1)
    return np.where(margin[np.arange(len(x)), best] < 0, best, -1)


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

    def unwanted(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: probability of any unwanted class (1 - p(natural)), and the most
        probable unwanted class (index into ``classes[1:]``)."""
        p = self.proba(x)
        return 1.0 - p[:, 0], p[:, 1:].argmax(axis=1)


def _class_weights(classes: list[str], counts: torch.Tensor) -> torch.Tensor:
    """Per class weight: natural and the unwanted classes together weigh the same, the
    unwanted classes equally among themselves (all classes equally without natural)."""
    if classes[0] != "natural" or len(classes) == 1:
        return 1.0 / (len(classes) * counts)
    w = 0.5 / ((len(classes) - 1) * counts)
    w[0] = 0.5 / counts[0]
    return w


def fit_probe(x: np.ndarray, labels: list[str], l2: float = 1e-3, seed: int = 0) -> Probe:
    """Weighted multinomial logistic regression on L2-normalized embeddings (LBFGS), natural
    weighing as much as the unwanted classes together. Fitted in the span of the examples
    (an exact reduction for an L2 penalty: the optimum's weights lie in that span), so a
    fit costs the same whatever the embedding width. Deterministic (``seed`` is kept for
    callers; the start is zero)."""
    del seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small problem: one thread beats several fighting over busy cores
    try:
        return _fit_probe(x, labels, l2)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(x: np.ndarray, labels: list[str], l2: float) -> Probe:
    classes = sorted(set(labels), key=lambda c: (c != "natural", c))
    y = torch.tensor([classes.index(c) for c in labels])
    xt = torch.from_numpy(normalize(x).astype(np.float64))
    # the span of the examples: z = x @ basis, basis = x.T @ u / sqrt(lambda) (eigh of the Gram matrix)
    lam, u = torch.linalg.eigh(xt @ xt.T)
    keep = lam > lam[-1] * 1e-9
    basis = xt.T @ (u[:, keep] / lam[keep].sqrt())
    z = xt @ basis
    counts = torch.bincount(y, minlength=len(classes)).double()
    sample_w = (_class_weights(classes, counts) * len(y))[y]
    w = torch.zeros(z.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=100, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(z @ w * 10 + b, y, reduction="none") * sample_w).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (basis @ w.detach() * 10).numpy()
    return Probe(classes, weight.astype(np.float32), b.detach().numpy().astype(np.float32))


def _stack(bank: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    names = list(bank)
    return np.concatenate([bank[c] for c in names]), [c for c in names for _ in range(len(bank[c]))]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


@dataclass
class ProbeFit:
    """A probe fitted on a whole bank, its threshold on p(unwanted), the chosen penalty, and
    the out-of-fold p(unwanted) of the natural and the unwanted examples behind them."""

    probe: Probe
    threshold: float
    l2: float
    oof_natural: np.ndarray
    oof_unwanted: np.ndarray
    oof_loss: dict


def probe_oof(bank: dict[str, np.ndarray], l2: float, fold_of: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Out-of-fold p(unwanted) of every example: each from a probe fitted without its fold."""
    out = {c: np.full(len(v), np.nan) for c, v in bank.items()}
    for f in np.unique(np.concatenate(list(fold_of.values()))):
        train = {c: bank[c][fold_of[c] != f] for c in bank}
        if any(len(v) == 0 for v in train.values()):
            continue  # a class entirely in this fold: its examples stay unscored
        probe = fit_probe(*_stack(train), l2=l2)
        for c in bank:
            m = fold_of[c] == f
            if m.any():
                out[c][m] = probe.unwanted(bank[c][m])[0]
    return out


def fit_probe_cv(bank: dict[str, np.ndarray], target_frr: float, k: int = 5, seed: int = 0,
                 groups: np.ndarray | None = None, l2_grid: tuple[float, ...] = L2_GRID) -> ProbeFit:
    """The probe on the whole bank (needs >= 2 natural examples), with its penalty chosen by
    k-fold cross-validation (lowest balanced log-loss of out-of-fold p(unwanted): naturals
    and unwanted examples weigh half each) and its threshold from those out-of-fold
    probabilities (``gap_threshold`` on their logits)."""
    fold_of = bank_folds(bank, k, seed, groups)
    best = None
    losses = {}
    for l2 in l2_grid:
        oof = probe_oof(bank, l2, fold_of)
        nat = oof["natural"][np.isfinite(oof["natural"])]
        un = np.concatenate([v for c, v in oof.items() if c != "natural"])
        un = un[np.isfinite(un)]
        loss = 0.5 * float(-np.log(np.clip(1 - nat, 1e-9, 1)).mean() if len(nat) else 0.0) + \
            0.5 * float(-np.log(np.clip(un, 1e-9, 1)).mean() if len(un) else 0.0)
        losses[l2] = round(loss, 5)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, l2, nat, un)
    _, l2, nat, un = best
    t = gap_threshold(_logit(nat), _logit(un), target_frr)
    probe = fit_probe(*_stack(bank), l2=l2)
    return ProbeFit(probe, float(1.0 / (1.0 + math.exp(-t))), l2, nat, un, losses)


def probe_with_threshold(bank: dict[str, np.ndarray], target_frr: float, k: int = 5,
                         seed: int = 0, groups: np.ndarray | None = None) -> tuple[Probe, float]:
    """The probe on the whole bank and its threshold on p(unwanted) (``fit_probe_cv``)."""
    fit = fit_probe_cv(bank, target_frr, k=k, seed=seed, groups=groups)
    return fit.probe, fit.threshold


def predict_probe(x: np.ndarray, probe: Probe, threshold: float, cats: list[str]) -> np.ndarray:
    """Method B: index in ``cats`` of the most probable unwanted class when p(unwanted) is
    above ``threshold``, else -1."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    pu, best = probe.unwanted(x)
    idx = np.array([cats.index(c) for c in probe.classes[1:]], dtype=np.int64)
    return np.where(pu > threshold, idx[best], -1)


# --------------------------------------------------------------------------- cross-validation

def cross_validate(bank: dict[str, np.ndarray], target_frr: float, k: int = 5, seed: int = 0,
                   groups: np.ndarray | None = None, inner_k: int = 3) -> dict:
    """k-fold estimates for both methods, each proportion with its 95% Wilson interval:

    * per category ``recall`` (held-out examples of the category rejected, as it or as any
      other unwanted category) and ``precision`` (held-out items predicted as the category
      that are that category; this depends on the bank's mix of categories and naturals);
    * overall recall, and the natural false-rejection rate (held-out natural examples
      rejected) with the share each category takes of those false rejections.

    ``bank`` maps category -> embeddings and may hold 'natural'; ``groups`` is the source of
    each natural example (default ``natural_groups``): a source's examples are held out
    together. Inside each fold both methods are fitted as on the whole bank: thresholds
    from the training split only, the probe's penalty and threshold by ``inner_k``-fold
    cross-validation of the training split."""
    cats = [c for c in sorted(bank) if c != "natural"]
    classes = [*cats, "natural"]
    if "natural" in bank and groups is None:
        groups = natural_groups(bank["natural"])
    fold_of = bank_folds(bank, k, seed, groups)
    has_natural = "natural" in bank and len(np.unique(fold_of["natural"])) >= 2
    # confusion[m][true class][predicted category index or -1]
    confusion = {m: {t: np.zeros(len(cats) + 1, np.int64) for t in classes} for m in ("A", "B")}
    paired = {"natural": [0, 0], "unwanted": [0, 0]}  # [wrong only by A, wrong only by B]
    for f in range(k):
        train = {c: bank[c][fold_of[c] != f] for c in fold_of}
        test = {c: bank[c][fold_of[c] == f] for c in fold_of}
        if any(len(train[c]) == 0 for c in cats) or not any(len(v) for v in test.values()):
            continue
        t = min_distance_threshold(train, target_frr)
        thr = {c: t for c in cats}
        predictors = {"A": lambda x: predict_min_distance(x, train, thr, cats)}
        if has_natural and len(train.get("natural", ())) >= 2:
            fit = fit_probe_cv(train, target_frr, k=inner_k, seed=seed, groups=groups[fold_of["natural"] != f])
            predictors["B"] = lambda x, fit=fit: predict_probe(x, fit.probe, fit.threshold, cats)
        for c in test:
            rejected = {}
            for m, predict in predictors.items():
                pred = predict(test[c])
                rejected[m] = pred >= 0
                confusion[m][c] += np.bincount(pred + 1, minlength=len(cats) + 1)[np.r_[1 : len(cats) + 1, 0]]
            if len(rejected) == 2:  # the same held-out examples, both methods: where they disagree
                wrong = {m: r if c == "natural" else ~r for m, r in rejected.items()}
                key = "natural" if c == "natural" else "unwanted"
                paired[key][0] += int((wrong["A"] & ~wrong["B"]).sum())
                paired[key][1] += int((wrong["B"] & ~wrong["A"]).sum())
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
                  "recall_k": all_k, "recall_n": all_n,
                  "natural_frr": nat_k / nat_n if nat_n else None, "natural_n": nat_n, "natural_k": nat_k,
                  "natural_frr_ci95": wilson(nat_k, nat_n) if nat_n else None}
    out["natural_sources"] = int(len(np.unique(groups))) if groups is not None else 0
    out["paired"] = {"natural_rejected_only_by": {"min_distance": paired["natural"][0], "probe": paired["natural"][1]},
                     "unwanted_missed_only_by": {"min_distance": paired["unwanted"][0], "probe": paired["unwanted"][1]}}
    return out


def sign_test(b: int, c: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) of ``b`` vs ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def choose_method(cv: dict, n_natural: int, n_sources: int, min_natural: int = PROBE_MIN_NATURAL,
                  min_sources: int = PROBE_MIN_SOURCES, alpha: float = 0.05) -> tuple[str, str]:
    """``("min_distance" | "probe", why)`` from ``cross_validate``'s estimates: the method
    with the lower natural false rejection at equal or better recall (or the better recall
    at equal false rejection). Both are measured on the same held-out examples, so a
    difference counts when the examples only one method gets wrong lean to it beyond
    chance (exact sign test, p < ``alpha``); otherwise the two are equal there. On a tie,
    or when each is better at one, the probe only with at least ``min_natural`` natural
    examples from at least ``min_sources`` sources (a probe fitted to a few photos learns
    those photos, and cross-validation over a few sources cannot show it), else
    min_distance."""
    a, b = cv.get("A") or {}, cv.get("B") or {}
    pair = cv.get("paired")
    if not a.get("natural_n") or not b.get("natural_n") or not a.get("recall_n") or not pair:
        return "min_distance", "no cross-validated comparison is possible (too few natural examples or folds)"

    def line(r: dict) -> str:
        return (f"natural false rejection {r['natural_k']}/{r['natural_n']} = {r['natural_frr']:.1%}, "
                f"recall {r['recall_k']}/{r['recall_n']} = {r['recall']:.1%}")

    verdict, notes = {}, []
    for what, key in (("false rejection", "natural_rejected_only_by"), ("recall", "unwanted_missed_only_by")):
        wa, wb = pair[key]["min_distance"], pair[key]["probe"]  # examples only that method gets wrong
        p = sign_test(wa, wb)
        verdict[what] = None if p >= alpha or wa == wb else ("probe" if wa > wb else "min_distance")
        notes.append(f"{what}: wrong only by min_distance {wa}, only by the probe {wb}, sign test p = {p:.2g}")
    cv_line = f"cross-validated: probe {line(b)}; min_distance {line(a)} ({'; '.join(notes)})"
    better = {v for v in verdict.values() if v is not None}
    if len(better) == 1:
        m = better.pop()
        return m, f"{cv_line}: {'the probe' if m == 'probe' else 'min_distance'} is better"
    how = "equal within chance" if not better else "each better at one"
    if n_natural >= min_natural and n_sources >= min_sources:
        return "probe", (f"{cv_line}: {how}; the probe, as the bank has {n_natural} natural examples from "
                         f"{n_sources} sources (>= {min_natural} from >= {min_sources})")
    return "min_distance", (f"{cv_line}: {how}; min_distance, as the bank has {n_natural} natural examples from "
                            f"{n_sources} sources (the probe needs >= {min_natural} from >= {min_sources})")


def small_categories(n_examples: dict[str, int], minimum: int = MIN_CATEGORY_EXAMPLES) -> dict[str, int]:
    """Unwanted categories with fewer than ``minimum`` examples (their recall cannot be estimated)."""
    return {c: int(n) for c, n in sorted(n_examples.items()) if c != "natural" and n < minimum}


def small_category_warning(category: str, n: int) -> str:
    return f"category '{category}' has {n} example{'s' if n != 1 else ''}: its recall cannot be estimated"
