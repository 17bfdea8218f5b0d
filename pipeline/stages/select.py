"""select: the catalog join and subset selection, before any pixel is read.

The selection (``stages/select``: flags per catalog/input row) is built from the catalog
and the input's metadata alone; ingest then reads only what it keeps. Where the input's
keys are known only once it has been listed (folders, shards), the catalog is joined to
the narrow table after the pass (``stages/select.join``). The work is in
``pipeline.catalog`` (Ray) over ``stages.select`` (pure)."""

from __future__ import annotations

from manifests.schema import Stage
from pipeline import catalog
from pipeline.stage import Context, Output, StageDef


def selecting(ctx: Context) -> bool:
    """A catalog to join, or predicates/caps to apply."""
    return bool(ctx.cfg.catalog.path) or ctx.cfg.select.active


def _outputs(ctx: Context) -> list[Output]:
    outs = [Output("select", narrow=False, before_pass=True)]
    if catalog.joins_after_pass(ctx.cfg, ctx.kind):
        outs.append(Output("select.join"))
    return outs


def _build(ctx: Context, out: Output):
    cfg = ctx.cfg
    if out.name == "select":
        ds = catalog.selection_dataset(cfg, ctx.kind).materialize()
        return ds, catalog.selection_counts(ds)
    narrow = ctx.rd.read(ctx.upstream)
    key, base = catalog.input_key_column(cfg, ctx.kind, narrow.schema().names)
    return catalog.join_catalog(cfg, narrow, ctx.read("select"), key, base)


def _summary(ctx: Context) -> dict:
    join = ctx.built("select.join") if "select.join" in ctx.fingerprints else \
        ctx.marker_counts(ctx.facts["pass"]).get("join")
    selection = {"select": ctx.built("select"), "join": join}
    return {"selection": {k: v for k, v in selection.items() if v}}


def _describe(ctx: Context) -> str:
    c = ctx.cfg
    cap = c.select.max_per_taxon
    return (f"catalog {c.catalog.path or 'none'}, predicates {len(c.select.where)}, "
            f"{f'at most {cap.max} per {cap.column}' if cap else 'no taxon cap'}  writes stages/select"
            + ("; joins after the pass: stages/select.join" if catalog.joins_after_pass(c, ctx.kind) else ""))


STAGE = StageDef(
    name=Stage.SELECT, module=__name__, sections=("select", "catalog", "input", "run.seed"), runs_with=Stage.INGEST,
    doc="Catalog join and subset selection (predicates, per-taxon caps) on metadata only; ingest reads "
        "only the selected rows",
    resources="Ray Data read + hash join on CPU tasks",
    enabled=selecting, build=_build, outputs=_outputs, summary=_summary, describe=_describe)
