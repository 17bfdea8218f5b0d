"""The plan: the ordered list of stage declarations, and the run derived from it.

Each stage is declared once, in its own module under ``pipeline/stages/``
(``pipeline.stage.StageDef``). From this list come which outputs a run builds and in
which order, their fingerprints (``--resume``), the plan printed at start, the summary
and the README's stage table. The streaming stages that run (ingest, validate, embed)
are fused into one Ray Data pass that writes the narrow table (never pixels) as
``stages/<last of them>``; every other output is ``stages/<stage>`` or
``stages/<stage>.<part>``, written under a temporary name and committed with its
fingerprint. The curated and rejected manifests are then written from the last narrow
table and committed with ``_SUCCESS``. Only this package imports ``ray``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray

from manifests import io as mio
from manifests import rejects
from manifests.config import STAGES, PipelineConfig
from pipeline import __version__, embedding, ids, refresh
from pipeline.rundir import RunDir, init_ray
from pipeline.stage import Context, Output, StageDef, code_hash, fingerprint
from pipeline.stages import embed, exact_dedup, ingest, near_dedup, sample, select, validate
from pipeline.stages import filter as filtering
from stages.ingest import detect_kind

log = logging.getLogger("biocurate")

PLAN: list[StageDef] = [select.STAGE, ingest.STAGE, validate.STAGE, embed.STAGE, exact_dedup.STAGE, filtering.STAGE,
                        near_dedup.STAGE, sample.STAGE]


# --------------------------------------------------------------------------- the steps

@dataclass(frozen=True)
class Step:
    """One output the run builds: the streaming pass (``stages`` its fused stages) or one
    output of one stage."""

    output: Output
    stages: tuple[StageDef, ...]
    streaming: bool = False

    @property
    def name(self) -> str:
        return self.output.name


def active(ctx: Context) -> list[StageDef]:
    """The stages this run executes: reached by ``--until`` and enabled."""
    return [d for d in PLAN if d.reached(ctx) and d.enabled(ctx)]


def steps(ctx: Context) -> list[Step]:
    """The outputs, in order: what runs before the pass, the pass, then every stage's outputs."""
    stages = active(ctx)
    streaming = tuple(d for d in stages if d.stream is not None)
    ctx.facts["pass"] = streaming[-1].name.value
    outs = [(d, o) for d in stages for o in d.outputs_of(ctx)]
    return ([Step(o, (d,)) for d, o in outs if o.before_pass]
            + [Step(Output(ctx.facts["pass"]), streaming, streaming=True)]
            + [Step(o, (d,)) for d, o in outs if not o.before_pass])


def fingerprints(ctx: Context, plan: list[Step]) -> dict[str, str]:
    """Fingerprint of every output: the settings and ``extra`` of its stage(s), the code of
    their import closures, and upstream: the narrow table it reads plus every side table
    (selection, embeddings) built before it."""
    fps: dict[str, str] = {}
    narrow, side = "", []
    for st in plan:
        section = {d.name.value: {"settings": d.section(ctx.cfg), "extra": d.extra(ctx, None if st.streaming
                                                                                   else st.output)}
                   for d in st.stages}
        fps[st.name] = fingerprint(section, code_hash(*(d.module for d in st.stages)),
                                   narrow + "".join(fps[s] for s in side))
        if st.output.narrow:
            narrow = fps[st.name]
        else:
            side.append(st.name)
    return fps


def stage_fingerprints(cfg: PipelineConfig, until: str = STAGES[-1], kind: str = "folder", plans: list | None = None,
                       prev=None) -> dict[str, str]:
    """The fingerprints a run of ``cfg`` would check (no Ray needed)."""
    ctx = Context(cfg, until, kind, RunDir(cfg), prev, list(plans or []))
    return fingerprints(ctx, steps(ctx))


# --------------------------------------------------------------------------- docs

def describe(ctx: Context, plan: list[Step]) -> str:
    """The plan printed at start: one line per output."""
    cfg = ctx.cfg
    lines = [f"biocurate {__version__}: {ctx.kind} input {cfg.input.paths()} -> {cfg.output} (until {ctx.until})"]
    for st in plan:
        if st.streaming:
            lines.append(f"  {'pass':<12}{' -> '.join(d.name.value for d in st.stages)}, streamed; writes "
                         f"stages/{st.name} (the narrow table: no pixels)")
            lines += [f"    {d.name.value:<10}{d.describe(ctx)}" for d in st.stages if d.describe]
        elif st.stages[0].describe and st.output.key is None:
            lines.append(f"  {st.name:<12}{st.stages[0].describe(ctx)}")
    lines.append(f"  {'manifest':<12}curated/ + rejected/ + summary.json, committed with _SUCCESS")
    return "\n".join(lines)


def stage_table() -> str:
    """The README's stage table (``scripts/readme_config.py`` writes it there)."""
    rows = ["| stage | what it does | config it reads | runs on | declared in |", "|---|---|---|---|---|"]
    for d in PLAN:
        sections = ", ".join(f"`{s}`" for s in (*d.sections, *d.extra_sections))
        rows.append(f"| `{d.name.value}` | {d.doc} | {sections} | {d.resources} | "
                    f"`{d.module.replace('.', '/')}.py` |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- run

def run(cfg: PipelineConfig, until: str = STAGES[-1], resume: bool = False, kind: str | None = None) -> dict:
    """Execute the plan; returns the summary (also written to ``<output>/summary.json``).
    ``kind``: the input kind when already detected (``run.check_inputs``), else detected here."""
    t_start = time.time()
    kind = kind or detect_kind(cfg.input, cfg.storage)
    prev = refresh.load_previous(cfg)
    cfg = refresh.with_previous_cache(cfg, prev)
    init_ray(cfg)
    rd = RunDir(cfg)
    ctx = Context(cfg, until, kind, rd, prev)
    for d in PLAN:
        if d.setup is not None and d.reached(ctx):
            d.setup(ctx)
    plan = steps(ctx)
    from pipeline import console, progress

    console.CONSOLE.line(describe(ctx, plan))
    shown = progress.PROGRESS = progress.Progress(console.CONSOLE, cfg.run.progress_interval_s, cfg.run.progress_bars)
    try:
        return _run(cfg, until, resume, ctx, plan, prev, t_start)
    finally:
        shown.close()
        progress.PROGRESS = None


def _run(cfg: PipelineConfig, until: str, resume: bool, ctx: Context, plan: list[Step], prev, t_start: float) -> dict:
    from pipeline import progress

    rd = ctx.rd
    fps = ctx.fingerprints = fingerprints(ctx, plan)
    timings, reused = {}, []

    # Whatever a previous run committed at the top is stale from here on: drop its markers
    # first so an interrupted run never leaves a manifest that looks complete.
    for marker in (rd.path(mio.SUCCESS), rd.path("curated", mio.SUCCESS), rd.path("rejected", mio.SUCCESS)):
        if rd.fs.exists(marker):
            rd.fs.rm(marker)

    for st in plan:
        final = ctx.path(st.name)
        if resume and rd.stage_done(st.name, fps[st.name]):
            reused.append(st.name)
            log.info("stage %s: fingerprint %s matches, reused", st.name, fps[st.name])
        else:
            t0 = time.time()
            progress.PROGRESS.start(" -> ".join(d.name.value for d in st.stages) if st.streaming else st.name)
            counts = ctx.counts.setdefault(st.name, {})
            if st.streaming:
                ds = None
                for d in st.stages:
                    ds = d.stream(ctx, ds)
                for d in st.stages:
                    if d.finish is not None:
                        ds = d.finish(ctx, ds, st.name)
            else:
                ds, got = st.stages[0].build(ctx, st.output)
                counts.update(got)
            hooks = ctx.facts.pop("before_commit", [])
            rd.write(ds, final, {"fingerprint": fps[st.name], "stage": st.name, "counts": counts},
                     (lambda: [h() for h in hooks]) if hooks else None)
            for scratch in ctx.facts.pop("scratch", []):
                if rd.fs.exists(scratch):
                    rd.fs.rm(scratch, recursive=True)
            timings[st.name] = round(time.time() - t0, 3)
            progress.PROGRESS.finish()
        if st.output.narrow:
            ctx.upstream = final

    t0 = time.time()
    progress.PROGRESS.start("manifest")
    decided = (rd.read(ctx.upstream).map_batches(embedding.drop_embeddings, batch_format="pyarrow")
               .map_batches(_with_duplicate_of, batch_format="pyarrow").materialize())
    staging = rd.path(f".staging-{int(t_start)}")
    repeats = ids.count_repeats(decided)  # rows whose source repeated a name (given an ordinal id)
    decided = decided.map_batches(ids.drop_repeat, batch_format="pyarrow")
    rd.write(decided.map_batches(_alive, batch_format="pyarrow"), mio.join(staging, "curated"), {})
    rd.write(decided.map_batches(_dead, batch_format="pyarrow"), mio.join(staging, "rejected"), {})
    counts = count_reasons(decided)
    for part in ("curated", "rejected"):
        mio.commit(rd.fs, mio.join(staging, part), rd.path(part), {"fingerprints": fps})
    if rd.fs.exists(staging):  # S3 has no empty folders: nothing may be left to remove
        rd.fs.rm(staging, recursive=True)
    timings["manifest"] = round(time.time() - t0, 3)
    progress.PROGRESS.finish()
    refresh_report: dict = {}
    if prev is not None:
        t0 = time.time()
        refresh_report = {"previous": prev.uri, "diff": refresh.write_diff(rd, decided, prev),
                          "previous_version": prev.summary.get("version", 1)}
        timings["diff"] = round(time.time() - t0, 3)

    n_rejected = sum(sum(v.values()) for v in counts["rejected"].values())
    summary = {
        "inputs": counts["curated"] + n_rejected,
        "curated": counts["curated"],
        "rejected": n_rejected,
        "rejected_by_stage": counts["rejected"],
        "repeated_names": repeats,
    }
    for d in PLAN:  # every stage says its part (also when it did not run: its keys are then empty)
        part = dict(d.summary(ctx))
        own_refresh = part.pop("refresh", None) or {}
        if prev is not None:
            refresh_report.update(own_refresh)
        summary.update(part)
    summary.update({
        # the stages' warnings (kept in their markers, so a resumed run still says them), then
        # this run's own (said live: a GPU waited for)
        "warnings": [w for st in plan for w in ctx.marker_counts(st.name).get("warnings") or []]
                    + list(progress.PROGRESS.warnings),
        "until": until,
        "version": prev.summary.get("version", 1) + 1 if prev is not None else 1,
        "refresh": refresh_report or None,
        "stages_run": [st.name for st in plan if st.name not in reused],
        "stages_reused": reused,
        "fingerprints": fps,
        "timings_s": {**timings, "total": round(time.time() - t_start, 3)},
        "config": cfg.dump(),
        "versions": versions(),
    })
    with rd.fs.open(rd.path("summary.json"), "wb") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True).encode())
    mio.write_marker(rd.fs, rd.root, {"fingerprints": fps})  # committed: the report is extra
    from pipeline import report

    where = report.write_report_safely(cfg.output, cfg.storage)  # a failure is a one-line warning
    return {**summary, "report": where}  # (where report.html is: not in summary.json, written before it)


# --------------------------------------------------------------------------- manifest

def _with_duplicate_of(batch: pa.Table) -> pa.Table:
    return rejects.ensure_columns(batch, duplicate_of=True)


def _alive(batch: pa.Table) -> pa.Table:
    kept = batch.filter(pa.array(rejects.alive(batch)))
    return kept.drop_columns([c for c in (*rejects.REJECT_COLUMNS, rejects.DUPLICATE_OF) if c in kept.column_names])


def _dead(batch: pa.Table) -> pa.Table:
    return batch.filter(pa.array(rejects.rejected(batch)))


def _reason_counts(batch: pa.Table) -> pa.Table:
    # A plain Counter: pyarrow's threaded group_by has failed inside Ray workers
    # ("thread index out of range").
    counts = Counter(zip(batch["stage"].to_pylist(), batch["reason"].to_pylist()))
    keys = sorted(counts, key=lambda k: (k[0] or "", k[1] or ""))
    return pa.table({"stage": pa.array([k[0] for k in keys], pa.string()),
                     "reason": pa.array([k[1] for k in keys], pa.string()),
                     "n": pa.array([counts[k] for k in keys], pa.int64())})


def count_reasons(ds: ray.data.Dataset) -> dict:
    """``{"curated": n, "rejected": {stage: {reason: n}}}`` over a decided narrow table."""
    rows = ds.select_columns(["stage", "reason"]).map_batches(_reason_counts, batch_format="pyarrow").take_all()
    curated, rejected = 0, {}
    for r in rows:
        if r["reason"] is None:
            curated += r["n"]
        else:
            by = rejected.setdefault(r["stage"], {})
            by[r["reason"]] = by.get(r["reason"], 0) + r["n"]
    return {"curated": curated, "rejected": {s: dict(sorted(v.items())) for s, v in sorted(rejected.items())}}


def versions() -> dict:
    import importlib.metadata as md

    out = {"biocurate": __version__, "python": sys.version.split()[0]}
    for pkg in ("ray", "torch", "pyarrow", "pillow", "s3fs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
