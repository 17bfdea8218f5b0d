"""filter: technical quality thresholds, the example-based non-natural filter and the
LAION aesthetic score, decided per row on the narrow table.

The example bank is listed, embedded with the filter model and fitted first (once, in
the driver: ``pipeline.examples`` over ``stages.kernels.examples``); every row is then
scored by ``stages.filters`` (pure) with its embedding joined by id."""

from __future__ import annotations

import pyarrow as pa
import ray

import stages.filters
from manifests.config import PipelineConfig
from manifests.schema import Stage
from pipeline import embedding, joins
from pipeline import examples as bank_examples
from pipeline.stage import Context, StageDef


def _examples_on(ctx: Context) -> bool:
    return bool(ctx.cfg.examples.path) and bool(ctx.plans)


def _bank(ctx: Context):
    """The example bank's rows (listed once per run)."""
    if "bank_rows" not in ctx.facts:
        ctx.facts["bank_rows"] = bank_examples.bank_rows(ctx.cfg) if _examples_on(ctx) else None
    return ctx.facts["bank_rows"]


def _aesthetic_on(ctx: Context) -> bool:
    if "aesthetic" not in ctx.facts:
        ctx.facts["aesthetic"] = embedding.aesthetic_active(ctx.cfg, ctx.plans)
    return ctx.facts["aesthetic"]


def with_embeddings(rd, narrow: ray.data.Dataset, plans: list, name: str) -> ray.data.Dataset:
    """``narrow`` with model ``name``'s ``embedding`` column, joined by id (null for rows
    that have none: rejected before the embedding stage)."""
    plan = next(p for p in plans if p.name == name)
    embs = rd.read(rd.path("stages", embedding.table_name(plan))).select_columns(["id", "embedding"])
    return joins.join(narrow, embs, "id", "left_outer", rd.cfg.run.broadcast_join_mb)


def nonnatural_dataset(cfg: PipelineConfig, rd, narrow: ray.data.Dataset, plans: list, device: str,
                       bank_rows: pa.Table) -> tuple[ray.data.Dataset, dict]:
    """Embed the example bank with the filter model and fit it, join the filter model's
    embeddings to the narrow rows by id, decide per row. Returns the rows and the report."""
    plan = next(p for p in plans if p.name == cfg.embed.model_for("filter"))
    bank, counts = bank_examples.embed_bank(cfg, bank_rows, plan, device)
    model, report = bank_examples.fit(cfg, bank)
    report.update({"examples_rejected": counts["examples_rejected"], "model_id": plan.model_id,
                   "bank_embeddings": {"computed": counts["computed"], "cached": counts["cached"]}})
    joined = with_embeddings(rd, narrow, plans, plan.name)
    return joined.map_batches(stages.filters.nonnatural_decisions, batch_format="pyarrow",
                              fn_kwargs={"model": model}), report


def _build(ctx: Context, out):
    cfg, rd = ctx.cfg, ctx.rd
    counts: dict = {}
    ds = (rd.read(ctx.upstream).map_batches(embedding.drop_embeddings, batch_format="pyarrow")
          .map_batches(stages.filters.quality_decisions, batch_format="pyarrow", fn_kwargs={"cfg": cfg.quality}))
    if _examples_on(ctx):
        ds, counts = nonnatural_dataset(cfg, rd, ds, ctx.plans, ctx.device, _bank(ctx))
    if _aesthetic_on(ctx):
        ds = with_embeddings(rd, ds, ctx.plans, cfg.embed.model_for("aesthetic")).map_batches(
            stages.filters.aesthetic_decisions, batch_format="pyarrow",
            fn_kwargs={"head": cfg.aesthetic.head, "weights": cfg.aesthetic.weights,
                       "min_score": cfg.aesthetic.min_score})
    return ds, counts


def _extra(ctx: Context, out) -> dict:
    examples = {k: v for k, v in ctx.cfg.section("examples").items() if k != "labels"}  # labels: report only
    bank = _bank(ctx)
    return {"examples": examples, "bank": bank_examples.listing_hash(bank) if bank is not None else "",
            "aesthetic_scored": _aesthetic_on(ctx)}


def _summary(ctx: Context) -> dict:
    scored = "filter" in ctx.fingerprints and _aesthetic_on(ctx)
    return {"examples": ctx.built("filter") if _examples_on(ctx) else None,
            "aesthetic": {"head": ctx.cfg.aesthetic.head, "scored": scored,
                          "min_score": ctx.cfg.aesthetic.min_score if scored else None}}


def _describe(ctx: Context) -> str:
    on = {k: v for k, v in ctx.cfg.section("quality").items() if v is not None}
    return (f"quality thresholds {on or 'none'}; examples {ctx.cfg.examples.path if _examples_on(ctx) else 'off'}; "
            f"aesthetic {'on' if _aesthetic_on(ctx) else 'off'}")


STAGE = StageDef(
    name=Stage.FILTER, module=__name__, sections=("quality", "aesthetic"), extra_sections=("examples",),
    doc="Technical quality thresholds; non-natural images by example (method chosen by cross-validation on "
        "the bank); LAION aesthetic score",
    resources="CPU tasks per block; the bank is fitted in the driver",
    build=_build, extra=_extra, summary=_summary, describe=_describe)
