"""validate: decode every image once, reject the broken and out-of-bounds ones, measure
hashes and technical quality (``stages.validate``, pure), in the streaming pass.

When models run, the same decode also gives their inputs (``pipeline.embedding``). A
refresh copies the previous run's validation of images it has seen, when the validate
settings and code are unchanged (:func:`fingerprint`), instead of decoding them again."""

from __future__ import annotations

import ray

from manifests.schema import Stage
from pipeline import embedding, refresh
from pipeline.joins import resolve_ref
from pipeline.rundir import map_batches, remote_kwargs
from pipeline.stage import Context, StageDef, code_hash, fingerprint
from stages.validate import ValidateStage


def validate_fingerprint(cfg) -> str:
    """What validation depends on (settings and code of ``stages.validate`` and what it
    imports): a refresh copies a previous run's validation only when this matches."""
    return fingerprint(cfg.section("validate"), code_hash("stages.validate"))


def _reuse(ctx: Context):
    """A refresh: the previous validation to copy (None: decode everything), and why not."""
    cfg, prev = ctx.cfg, ctx.prev
    if prev is None:
        return None
    known = ctx.facts["known"]
    why = ("refresh.reuse_validation is off" if not cfg.refresh.reuse_validation else
           "the previous run's validate settings or code differ"
           if not refresh.validate_fingerprint_matches(prev, validate_fingerprint(cfg)) else
           "embeddings are off but the previous run's were on" if ctx.plans and not cfg.embed.cache else None)
    ctx.counts.setdefault(ctx.facts["pass"], {})["refresh"] = {"validation_reused": why is None, "why_not": why}
    return refresh.reuse_plan(prev, known) if why is None else None


def _stream(ctx: Context, ds) -> ray.data.Dataset:
    cfg = ctx.cfg
    ctx.facts["known"] = embedding.known_sets(cfg, ctx.plans) if ctx.plans and cfg.embed.cache else {}
    reuse = ctx.facts["reuse"] = _reuse(ctx)
    keys = ray.put(reuse.keys) if reuse is not None else None
    if ctx.plans:  # one decode: validation and every model's input
        return embedding.validate_for_models(cfg, ds, ctx.plans, ctx.facts["known"], keys)
    return map_batches(ds, _Validate(cfg.validate_, keys), cfg, batch_size=cfg.run.batch_size, batch_format="pyarrow",
                       **remote_kwargs(cfg))


class _Validate:
    """``stages.validate.ValidateStage`` with the refresh's keys fetched (once per task)."""

    def __init__(self, cfg, reuse=None):
        self.cfg, self.reuse, self.stage = cfg, reuse, None

    def __call__(self, batch):
        if self.stage is None:
            self.stage = ValidateStage(self.cfg, reuse=resolve_ref(self.reuse) if self.reuse is not None else None)
        return self.stage(batch)


def _finish(ctx: Context, ds, name: str):
    """After the pass: copy the previous validation into the rows it did not decode."""
    reuse = ctx.facts.get("reuse")
    if reuse is None:
        return ds
    passed = ctx.path(f"{name}.pass")
    ctx.rd.write(ds, passed, {"fingerprint": ctx.fingerprints[name]})
    ctx.facts.setdefault("scratch", []).append(passed)
    ds, n = refresh.fill_reused(ctx.rd.read(passed), reuse, ctx.cfg.run.broadcast_join_mb)
    ctx.counts[name]["refresh"]["rows_not_decoded"] = n
    return ds


def _extra(ctx: Context, out) -> dict:
    return {"refresh": refresh.refresh_fingerprint(ctx.cfg, ctx.prev)}


def _describe(ctx: Context) -> str:
    v = ctx.cfg.validate_
    return (f"decode once (min side {v.min_side}, max {v.max_bytes} bytes, timeout {v.timeout_s} s), sha256, "
            f"pHash, quality  map_batches(num_cpus=1, batch_size={ctx.cfg.run.batch_size}, "
            f"concurrency={ctx.cfg.run.concurrency or 'auto'})")


STAGE = StageDef(
    name=Stage.VALIDATE, module=__name__, sections=("validate",),
    doc="Decode every image once with limits (bytes, pixels, JPEG scans, time in native code); EXIF, "
        "modes, sha256, pHash, technical quality; bad images become rejects",
    resources="CPU tasks, streamed (a decode process per task, killed on timeout)",
    stream=_stream, finish=_finish, extra=_extra, describe=_describe,
    summary=lambda ctx: {"validate_fingerprint": validate_fingerprint(ctx.cfg),
                         "refresh": {"validate": ctx.marker_counts(ctx.facts["pass"]).get("refresh")}
                         if ctx.prev is not None else {}})
