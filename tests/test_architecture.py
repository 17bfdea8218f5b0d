"""The shape of the code: import arrows one way, one stage vocabulary, fingerprints from
import closures (an edit anywhere in a stage's code invalidates that stage and what
follows it, and nothing before it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests.config import STAGES, load_config
from manifests.schema import Stage
from pipeline import stage as st

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "manifests")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module name ``name`` imports, anywhere in the file (functions included)."""
    return st.imported_names(MODULES[name], name, type_checking=True)


def _project_imports(name: str) -> set[str]:
    return {m for m in _imports(name) if m in MODULES and m != name}


def test_ray_is_imported_only_in_pipeline():
    bad = {m: sorted(i for i in _imports(m) if i == "ray" or i.startswith("ray."))
           for m in MODULES if not m.startswith("pipeline")}
    assert not {m: v for m, v in bad.items() if v}


def test_arrows_point_one_way():
    """manifests <- stages/kernels <- stages <- pipeline: nothing imports a layer above it."""
    errors = []
    for m in MODULES:
        for i in _project_imports(m):
            if m.startswith("manifests") and not i.startswith("manifests"):
                errors.append(f"{m} -> {i}")
            if m.startswith("stages") and i.startswith("pipeline"):
                errors.append(f"{m} -> {i}")
            if m.startswith("stages.kernels") and not (i.startswith("stages.kernels") or i == "stages"):
                errors.append(f"{m} -> {i} (a kernel is pure: no I/O, no config)")
    assert not errors, errors


def test_stage_declarations_do_not_import_each_other_or_the_plan():
    errors = []
    for m in MODULES:
        if m.startswith("pipeline.stages.") or m in ("pipeline.stage", "pipeline.rundir"):
            for i in _project_imports(m):
                if i.startswith("pipeline.stages.") or i == "pipeline.plan":
                    errors.append(f"{m} -> {i}")
        elif m not in ("pipeline.plan", "pipeline.run") and "pipeline.plan" in _project_imports(m):
            errors.append(f"{m} -> pipeline.plan (only the entry point runs the plan)")
    assert not errors, errors


def test_no_import_cycles():
    """Function-level imports count: a cycle hidden in a function is still a cycle."""
    graph = {m: _project_imports(m) - {p for p in MODULES if m.startswith(p + ".")} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_one_stage_vocabulary():
    from pipeline import plan

    assert [d.name for d in plan.PLAN] == list(Stage)  # one declaration per stage, in order
    assert list(STAGES) == [s.value for s in Stage if s is not Stage.SELECT]  # --until
    for d in plan.PLAN:
        assert d.module == f"pipeline.stages.{d.name.value}" and d.doc and d.resources


def test_the_plan_has_no_per_stage_branch():
    """pipeline/plan.py names stages only in PLAN: no ``Stage.X``, no stage name as a string,
    no stage module used outside the list."""
    import ast

    tree = ast.parse((ROOT / "pipeline" / "plan.py").read_text())
    plan_list = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "PLAN")
    in_list = {id(n) for n in ast.walk(plan_list)}
    modules = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "pipeline.stages"
               for a in n.names}
    assert len(modules) == len(Stage)
    names = {s.value for s in Stage}
    found = []
    for node in ast.walk(tree):
        if id(node) in in_list:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Stage":
            found.append(f"Stage.{node.attr} at line {node.lineno}")
        elif isinstance(node, ast.Constant) and node.value in names:
            found.append(f"{node.value!r} at line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id in modules:
            found.append(f"module {node.id} at line {node.lineno}")
    assert not found, found


def test_readme_stage_table_is_the_plan():
    from pipeline import plan

    readme = (ROOT / "README.md").read_text()
    assert plan.stage_table() in readme, "run: python scripts/readme_config.py"


# --------------------------------------------------------------------------- fingerprints

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A config where every stage runs (resolved models: the offline MobileNetV2)."""
    from pipeline import embedding, plan

    tmp = tmp_path_factory.mktemp("fp")
    (tmp / "in").mkdir()
    cfg = load_config(None, {"input.path": str(tmp / "in"), "output": str(tmp / "run"),
                             "catalog.path": str(tmp / "catalog.csv"), "catalog.key": "uri",
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}], "sample.fraction": 0.5})
    plans = embedding.model_plans(cfg)
    return cfg, plans, plan.stage_fingerprints(cfg, kind="webdataset", plans=plans)


def _edited(monkeypatch, module: str):
    """Fingerprints as they would be with ``module``'s file edited."""
    target = MODULES[module].resolve()
    real = st.source
    monkeypatch.setattr(st, "source", lambda p: real(p) + (b"\n# edited\n" if Path(p).resolve() == target else b""))


def _first_user(names: list[str], module: str) -> int:
    from pipeline import plan

    by_output = {}
    cfg_stages = {d.name.value: d for d in plan.PLAN}
    for n in names:
        base = n.split(".")[0]
        mods = ([cfg_stages[s].module for s in ("ingest", "validate", "embed")] if base in ("validate", "embed")
                and "." not in n else [cfg_stages[base].module])
        by_output[n] = set().union(*(st.closure(m) for m in mods))
    return next(i for i, n in enumerate(names) if module in by_output[n])


@pytest.mark.parametrize("module, first", [
    ("stages.kernels.sampling", "sample"),  # used by the sample stage only
    ("stages.kernels.near_dedup", "near_dedup"),  # near_dedup and sample (its alive rows)
    ("stages.kernels.exact_dedup", "exact_dedup"),
    ("stages.joins", "select"),  # the joins kernel: through pipeline.joins, from select on
    ("pipeline.refresh", "embed"),  # the pass reads a previous run (validation reuse)
    ("stages.kernels.quality", "embed"),  # through stages.validate: the pass
    ("stages.kernels.examples", "filter"),  # the example classifier
])
def test_editing_a_helper_invalidates_the_stages_that_use_it_and_only_those(planned, monkeypatch, module, first):
    from pipeline import plan

    cfg, plans, before = planned
    names = list(before)
    assert names == ["select", "embed", "select.join", "embed.mobilenet_v2_imagenet", "exact_dedup", "filter",
                     "near_dedup", "sample"]
    _edited(monkeypatch, module)
    st.closure.cache_clear()
    after = plan.stage_fingerprints(cfg, kind="webdataset", plans=plans)
    changed = [n for n in names if after[n] != before[n]]
    i = _first_user(names, module)
    assert names[i] == first
    assert changed == names[i:]  # the first output whose code imports it, and everything built after it


def test_closures_are_the_imports():
    c = set(st.closure("pipeline.stages.sample"))
    assert {"stages.kernels.sampling", "stages.kernels.kmeans", "pipeline.joins", "stages.joins"} <= c
    assert "stages.kernels.sampling" not in st.closure("pipeline.stages.near_dedup")
    assert "pipeline.plan" not in set().union(*(st.closure(f"pipeline.stages.{s.value}") for s in Stage))
    # the modules the issue found outside every fingerprint are inside the closures now
    assert "pipeline.refresh" in st.closure("pipeline.stages.validate")
    assert "stages.joins" in st.closure("pipeline.stages.filter")
