"""The example bank of the non-natural filter, on Ray: list it, embed it with the filter
model through the same decode and actors as the corpus (so it sees exactly the same
preprocessing), fit the chosen method, set thresholds from data and estimate recall and
natural false rejection by cross-validation (``stages.kernels.examples``)."""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import ray

from pipeline import embedding
from manifests.config import ConfigError, PipelineConfig
from stages import embed as emb
from stages import ingest
from stages.kernels import examples as kx
from stages.ids import with_protocol_rejects


def bank_rows(cfg: PipelineConfig) -> pa.Table:
    """``id, uri, category``: every image under ``<examples.path>/<category>/``, or the rows
    of the ``uri,category`` table ``examples.path`` names."""
    root = cfg.examples.path
    if is_table(root):
        return _table_rows(root, cfg)
    try:
        _, dirs = ingest.split_listing(root, cfg.storage, cfg.input.extensions)
    except (OSError, ValueError) as e:
        raise ConfigError(f"examples error: cannot list examples.path {root}: {e}") from None
    uris, cats = [], []
    for d in sorted(dirs):
        cat = posixpath.basename(d.rstrip("/"))
        for u in ingest.list_prefix(d, cfg.storage, cfg.input.extensions):
            uris.append(u)
            cats.append(cat)
    if not any(c != "natural" for c in cats):
        raise ConfigError(f"examples error: {root} has no sub-folder of unwanted example images "
                          "(one sub-folder per category, natural/ for wanted ones)")
    return ingest.uri_rows(uris).append_column("category", pa.array(cats, pa.string()))  # unsafe names rejected


def is_table(path: str) -> bool:
    return ("." + path.rsplit(".", 1)[-1]).lower() in ingest.TABLE_SUFFIXES


def read_small_table(path: str, cfg: PipelineConfig, what: str) -> pa.Table:
    """A small user table (example bank, labels) read in this process; ConfigError if unreadable."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    from manifests.io import filesystem

    try:
        fs, p = filesystem(path, cfg.storage)
        with fs.open(p, "rb") as f:
            fmt = ingest.TABLE_SUFFIXES[("." + p.rsplit(".", 1)[-1]).lower()]
            return {"parquet": pq.read_table, "csv": pacsv.read_csv, "json": pajson.read_json}[fmt](f)
    except Exception as e:  # noqa: BLE001 - any unreadable table is one line
        raise ConfigError(f"{what}: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _table_rows(path: str, cfg: PipelineConfig) -> pa.Table:
    t = read_small_table(path, cfg, "examples error")
    missing = [c for c in ("uri", "category") if c not in t.column_names]
    if missing:
        raise ConfigError(f"examples error: {path} needs columns uri, category (missing {missing}; has {t.column_names})")
    base = posixpath.dirname(path)
    uris, cats = [], []
    for u, c in zip(t["uri"].to_pylist(), t["category"].to_pylist()):
        if not u or not c:
            continue
        u, c = str(u), str(c).strip()
        if "://" not in u and not u.startswith("/"):
            u = posixpath.join(base, u)
        uris.append(u)
        cats.append(c)
    if not any(c != "natural" for c in cats):
        raise ConfigError(f"examples error: {path} has no row of an unwanted category (category other than natural)")
    # a uri whose protocol may not be read is an examples_rejected row, never fetched
    return with_protocol_rejects(ingest.uri_rows(uris).append_column("category", pa.array(cats, pa.string())),
                                 cfg.storage.allowed_protocols)


def listing_hash(rows: pa.Table) -> str:
    blob = "\n".join(f"{c}\t{u}" for u, c in sorted(zip(rows["uri"].to_pylist(), rows["category"].to_pylist())))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def embed_listed(cfg: PipelineConfig, rows: pa.Table, plan: emb.ModelPlan | None, device: str,
                 columns: list[str]) -> tuple[list[dict], dict]:
    """Fetch, validate and (with ``plan``) embed a small listed image set (``id, uri`` +
    ``columns``) through the corpus' decode and actors. Returns the rows that validated,
    each with ``columns``, ``sha256``, ``phash`` and ``embedding`` (None without a plan),
    and counts: rows rejected, embeddings computed, embeddings read from the cache.

    The set shares the corpus' embedding cache (same keys: sha256, model id,
    preprocessing, dtype): a rerun, a refresh or a changed threshold embeds nothing twice."""
    ds = ray.data.from_arrow(rows).map_batches(ingest.fetch_batch, batch_format="pyarrow",
                                               fn_kwargs={"storage": cfg.storage, "max_bytes": cfg.validate_.max_bytes})
    if plan is None:
        ds = ds.map_batches(embedding.ValidateForModels(cfg, [], {}), batch_format="pyarrow")
        got = ds.select_columns([*columns, "reason", "sha256", "phash"]).take_all()
        alive = [{**r, "embedding": None} for r in got if r["reason"] is None]
        return alive, {"rejected": len(got) - len(alive), "computed": 0, "cached": 0}
    known = embedding.known_sets(cfg, [plan]) if cfg.embed.cache else {}
    ds = embedding.embed_actors(cfg, embedding.validate_for_models(cfg, ds, [plan], known), [plan], device)
    got = ds.select_columns([*columns, "reason", "sha256", "phash", plan.column]).take_all()
    alive = [r for r in got if r["reason"] is None]
    computed = {r["sha256"]: r[plan.column] for r in alive if r[plan.column] is not None}
    missing = sorted({r["sha256"] for r in alive if r[plan.column] is None} - set(computed))
    # (the embedding actors added the computed ones to the cache already)
    found: dict = {}
    if missing:
        cached = embedding.cache_dataset(cfg, plan, ray.put(np.unique(emb.cache_keys(missing))))
        for r in (cached.take_all() if cached is not None else []):
            found.setdefault(r["sha256"], r["embedding"])
        lost = [h for h in missing if h not in found]
        if lost:
            raise RuntimeError(f"embedding cache of {plan.model_id} lost {len(lost)} embeddings; run again")
    out = [{**{k: r[k] for k in (*columns, "sha256", "phash")},
            "embedding": r[plan.column] if r[plan.column] is not None else found[r["sha256"]]} for r in alive]
    return out, {"rejected": len(got) - len(alive), "computed": len(computed), "cached": len(missing)}


def embed_bank(cfg: PipelineConfig, rows: pa.Table, plan: emb.ModelPlan, device: str) -> tuple[dict, dict]:
    """Category -> (n, dim) float32 embeddings of the bank; and counts: examples that failed
    to load or validate (left out), embeddings computed, embeddings read from the cache."""
    got, counts = embed_listed(cfg, rows, plan, device, ["category"])
    bank: dict[str, list] = {}
    for r in got:
        bank.setdefault(r["category"], []).append(np.asarray(r["embedding"], dtype=np.float32))
    return ({c: np.stack(v) for c, v in sorted(bank.items())},
            {"examples_rejected": counts["rejected"], "computed": counts["computed"], "cached": counts["cached"]})


def fit(cfg: PipelineConfig, bank: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The fitted filter (plain data for the filter tasks) and its report.

    Both methods are cross-validated on the bank (naturals folded by source); with
    ``examples.method: auto`` the estimates choose the method (``kx.choose_method``), and
    the report says which and why. A category with fewer than
    ``kx.MIN_CATEGORY_EXAMPLES`` examples is listed in ``small_categories`` and in the
    run's warnings."""
    e = cfg.examples
    cats = [c for c in bank if c != "natural"]
    natural = bank.get("natural")
    has_natural = natural is not None and len(natural) >= 2
    n_examples = {c: len(v) for c, v in bank.items()}
    small = kx.small_categories(n_examples)
    report: dict = {"method": e.method, "n_examples": n_examples, "target_frr": e.target_frr,
                    "small_categories": small}
    if small:
        report["warnings"] = [kx.small_category_warning(c, n) for c, n in small.items()]
    groups = kx.natural_groups(natural) if has_natural else None
    cv = None
    if has_natural and all(len(bank[c]) >= 2 for c in cats):
        cv = kx.cross_validate(bank, e.target_frr, k=e.folds, seed=cfg.run.seed, groups=groups)
        report["cross_validation"] = {"min_distance": cv["A"], "probe": cv["B"]}
        report["cross_validation_disagreements"] = cv["paired"]
    else:
        report["cross_validation"] = None
        report["note"] = ("no natural/ examples: thresholds are examples.default_threshold; the natural "
                          "false-rejection rate cannot be estimated, only recall by leave-one-out" if not has_natural
                          else "a category has fewer than 2 examples: no cross-validation")
    if has_natural:
        report["natural_sources"] = int(len(np.unique(groups)))
    if e.method != "auto":
        chosen, why = e.method, f"examples.method is {e.method}"
    elif cv is None:
        chosen, why = "min_distance", f"min_distance, as nothing could be cross-validated ({report['note']})"
    else:
        chosen, why = kx.choose_method(cv, len(natural), report["natural_sources"])
    report["chosen"], report["why"] = chosen, why
    model, extra = fit_method(bank, chosen, e.target_frr, k=e.folds, seed=cfg.run.seed, groups=groups,
                              default_threshold=e.default_threshold)
    report.update(extra)
    thresholds = model["thresholds"] if chosen == "min_distance" else {c: model["threshold"] for c in cats}
    report["thresholds"] = {c: round(float(t), 5) for c, t in thresholds.items()}
    if not has_natural:
        report["leave_one_out_recall"] = {
            c: float(np.mean(kx.loo_min_distance(bank[c]) < thresholds[c])) if len(bank[c]) >= 2 else None
            for c in cats}
    return model, report


def fit_method(bank: dict[str, np.ndarray], method: str, target_frr: float, k: int = 5, seed: int = 0,
               groups: np.ndarray | None = None, default_threshold: float = 0.15) -> tuple[dict, dict]:
    """One method fitted on the whole bank: the model (plain data for the filter tasks) and
    what the report adds for it. min_distance: one distance threshold from the bank
    (``default_threshold`` without natural examples); probe: penalty and threshold by
    k-fold cross-validation (``kx.fit_probe_cv``)."""
    cats = [c for c in bank if c != "natural"]
    natural = bank.get("natural")
    has_natural = natural is not None and len(natural) >= 2
    if method == "min_distance":
        t = kx.min_distance_threshold(bank, target_frr) if has_natural else default_threshold
        return {"method": "min_distance", "categories": cats, "thresholds": {c: t for c in cats},
                "bank": {c: kx.normalize(bank[c]) for c in cats}}, {}
    if not has_natural:
        raise ConfigError("examples error: method probe needs natural/ examples (at least 2)")
    if groups is not None and len(np.unique(groups)) < 2:
        raise ConfigError("examples error: method probe needs natural/ examples from at least 2 different photos "
                          "(all are crops or copies of one): its threshold cannot be cross-validated; use "
                          "method min_distance or auto")
    pf = kx.fit_probe_cv(bank, target_frr, k=k, seed=seed, groups=groups)
    return ({"method": "probe", "categories": cats, "classes": pf.probe.classes, "weight": pf.probe.weight,
             "bias": pf.probe.bias, "threshold": pf.threshold},
            {"probe": {"l2": pf.l2, "oof_log_loss": {f"{k:g}": v for k, v in pf.oof_loss.items()}}})
