"""embed: every configured model embeds every alive image, in the streaming pass.

GPU (or CPU) actors run the models (``stages.embed``, ``stages.backbones``) on the inputs
validate cut from its one decode; embeddings already in the cache (keyed by sha256,
model, preprocessing and dtype) are not computed again. After the pass, each model's
table (``stages/embed.<model>``: id, sha256, embedding) is resolved from the pass and the
cache (``pipeline.embedding``)."""

from __future__ import annotations

from manifests import io as mio
from manifests.schema import Stage
from pipeline import embedding
from pipeline.stage import Context, Output, StageDef


def _models(plans) -> list[dict]:
    return [{"model_id": p.model_id, "prep": p.prep, "dtype": p.dtype} for p in plans]


def _setup(ctx: Context) -> None:
    """The model plans (weights located, specs resolved) and the actors' device."""
    ctx.plans = embedding.model_plans(ctx.cfg) if ctx.cfg.embed.models else []
    ctx.device = embedding.resolve_device(ctx.cfg) if ctx.plans else "cpu"


def _stream(ctx: Context, ds):
    return embedding.embed_actors(ctx.cfg, ds, ctx.plans, ctx.device)


def _outputs(ctx: Context) -> list[Output]:
    return [Output(embedding.table_name(p), narrow=False, key=p) for p in ctx.plans]


def _build(ctx: Context, out: Output):
    return embedding.resolve_embeddings(ctx.cfg, ctx.rd.read(ctx.upstream), out.key)


def _extra(ctx: Context, out: Output | None):
    if out is None:  # the pass: which models it runs
        return {"models": _models(ctx.plans)}
    return {"model": _models([out.key]), "cache": ctx.cfg.embed.cache}


def _summary(ctx: Context) -> dict:
    return {"embed": {p.name: {**ctx.marker_counts(embedding.table_name(p)),
                               "table": mio.to_uri(ctx.rd.fs, ctx.path(embedding.table_name(p))),
                               "device": ctx.device} for p in ctx.plans}}


def _describe(ctx: Context) -> str:
    e = ctx.cfg.embed
    return "; ".join(f"{p.model_id} ({p.spec.size}px, {p.spec.dim}-d {p.dtype}) on {ctx.device}: actors "
                     f"concurrency={e.concurrency} batch_size={e.batch_size}  writes stages/{embedding.table_name(p)}"
                     for p in ctx.plans)


STAGE = StageDef(
    name=Stage.EMBED, module=__name__, sections=(), extra_sections=("embed",),
    doc="Embed with every configured model (BioCLIP-2, Bio-DINO, CLIP, SSCD, ...) on GPU actors, bf16, one "
        "decode for all models; cached by content, so a rerun or refresh embeds nothing twice",
    resources="actors: embed.num_gpus GPUs (or embed.num_cpus CPUs) each, embed.concurrency of them",
    setup=_setup, enabled=lambda ctx: bool(ctx.plans), stream=_stream, outputs=_outputs, build=_build, extra=_extra,
    summary=_summary, describe=_describe)
