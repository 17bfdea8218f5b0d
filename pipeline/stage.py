"""What a stage declares, and the fingerprints derived from it.

A stage is one :class:`StageDef` in its own module under ``pipeline/stages/``; the plan
(``pipeline/plan.py``) is the ordered list of them. From that list come the run (which
outputs to build, in which order, with which upstream table), the fingerprints that
``--resume`` checks, the plan printed at start (``describe``) and the README's stage
table. A stage either streams (``stream``: a per-row step fused into the one Ray Data
pass that reads the pixels) or builds outputs from the narrow table (``build``).

A fingerprint covers the config sections the stage reads, what its ``extra`` says it
depends on (the example bank's listing, a previous run) and the code of every project
module its declaration imports, transitively (:func:`closure`): no module list is kept by
hand, so an edit to a helper reached only through an import still invalidates exactly
the stages that use it, and the ones downstream of them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from manifests.config import PipelineConfig
from manifests.schema import Stage, reaches

if TYPE_CHECKING:  # the run directory and Ray are the plan's; a declaration gets them through the context
    from pipeline.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "manifests")  # the project's own code (hashed); anything else is a dependency


# --------------------------------------------------------------------------- the declaration

@dataclass(frozen=True)
class Output:
    """One table a stage writes: ``stages/<name>``. ``narrow``: it is the narrow table (every
    row, decisions so far) the next stage reads; otherwise a side table (embeddings,
    selection flags). ``before_pass``: built before the streaming pass (select)."""

    name: str
    narrow: bool = True
    before_pass: bool = False
    key: Any = None  # what the stage needs to build it (e.g. the model plan of an embedding table)


@dataclass(frozen=True)
class StageDef:
    """One stage. ``name``: its :class:`~manifests.schema.Stage`. ``sections``: the config
    sections it reads (in its fingerprint, printed by ``describe``). ``module``: the module
    holding the declaration; its import closure is the stage's code. ``doc`` and
    ``resources``: one line each for the README table and the plan printed at start.

    ``extra_sections``: config sections it also reads that reach its fingerprint through
    ``extra`` only, in the part that changes results (embed: the model identities and dtype,
    not its batch size or concurrency; filter: examples without the report-only labels).
    ``runs_with``: the stage whose ``--until`` reach decides whether it runs (select runs
    whenever ingest does: it decides what ingest reads); default: its own name.
    ``enabled(ctx)``: whether it runs (``--until`` is checked by the plan).
    ``setup(ctx)``: once Ray runs, before the plan is laid out: resolve what the stage and
    the ones after it need (the embedding models and their device) into the context.
    ``stream(ctx, ds)``: per-row stages; returns the dataset with this stage applied
    (``ds`` is None for the first one). The streaming stages that run are fused into one
    pass, written as ``stages/<last of them>``; ``finish(ctx, ds, name)``: applied to the
    pass's output before it is written.
    ``outputs(ctx)``: the tables it builds (default: one, named after the stage; none for a
    streaming stage). ``build(ctx, output) -> (dataset, counts)``: builds one of them.
    ``extra(ctx, output)``: what else its fingerprint depends on (JSON-able).
    ``summary(ctx)``: its part of ``summary.json`` (keys merged at the top level; a
    ``refresh`` key is merged into the summary's ``refresh`` report of a refresh).
    ``describe(ctx)``: its line of the plan printed at start."""

    name: Stage
    module: str
    sections: tuple[str, ...]
    doc: str
    resources: str
    extra_sections: tuple[str, ...] = ()
    runs_with: Stage | None = None
    enabled: Callable[["Context"], bool] = lambda ctx: True
    setup: Callable[["Context"], None] | None = None
    stream: Callable | None = None
    finish: Callable | None = None
    build: Callable | None = None
    outputs: Callable[["Context"], list[Output]] | None = None
    extra: Callable[["Context", Output], Any] = lambda ctx, out: None
    summary: Callable[["Context"], dict] = lambda ctx: {}
    describe: Callable[["Context"], str] | None = None

    def reached(self, ctx: "Context") -> bool:
        """Whether ``--until`` reaches it (``enabled`` aside)."""
        return ctx.runs(self.runs_with or self.name)

    def outputs_of(self, ctx: "Context") -> list[Output]:
        if self.outputs is not None:
            return self.outputs(ctx)
        return [] if self.stream is not None else [Output(self.name.value)]

    def section(self, cfg: PipelineConfig) -> dict:
        """The settings it reads: whole sections, or one key of one (``run.seed``)."""
        out = {}
        for s in self.sections:
            top, _, key = s.partition(".")
            got = cfg.section(top)
            out[s] = got[key] if key else got
        return out


@dataclass
class Context:
    """What a stage is given: the config, the run so far and the resolved inputs. Stages
    share facts only through here (``facts``: set by a stage's ``prepare``, read by later
    ones), never through imports of each other."""

    cfg: PipelineConfig
    until: str
    kind: str
    rd: "RunDir"
    prev: Any = None  # pipeline.refresh.Previous of a refresh, else None
    plans: list = field(default_factory=list)  # resolved embedding models (empty: no embed stage)
    device: str = "cpu"
    fingerprints: dict[str, str] = field(default_factory=dict)  # of every output built or reused so far
    upstream: str | None = None  # path of the current narrow table
    counts: dict[str, dict] = field(default_factory=dict)  # per output: the counts its marker holds
    facts: dict[str, Any] = field(default_factory=dict)

    def runs(self, stage: Stage | str) -> bool:
        """Whether ``--until`` reaches ``stage``."""
        return reaches(self.until, stage)

    def path(self, name: str) -> str:
        return self.rd.path("stages", name)

    def read(self, name: str):
        return self.rd.read(self.path(name))

    def marker_counts(self, name: str) -> dict:
        """The counts in output ``name``'s marker (this run's, or a reused one's)."""
        from manifests import io as mio

        got = self.counts.get(name)
        if got is None:
            got = (mio.read_marker(self.rd.fs, self.path(name)) or {}).get("counts") or {}
        return got

    def built(self, name: str) -> dict | None:
        """The counts of output ``name`` when this run built or reused it, else None (the
        summary's part of a stage that did not run)."""
        return (self.marker_counts(name) or None) if name in self.fingerprints else None

    def plan_of(self, role: str):
        """The embedding model plan that plays ``role`` (embed.roles), or None."""
        name = self.cfg.embed.model_for(role) if self.plans else None
        return next((p for p in self.plans if p.name == name), None)


# --------------------------------------------------------------------------- code closure

def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_names(path: Path, name: str, type_checking: bool = False) -> set[str]:
    """Every module name the file of module ``name`` imports, anywhere in it (functions
    included; ``if TYPE_CHECKING:`` blocks only with ``type_checking``); ``from a import b``
    gives ``a`` and ``a.b`` (b may be a module)."""
    tree = ast.parse(path.read_bytes(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def skip(node) -> bool:
        t = getattr(node, "test", None)
        return not type_checking and isinstance(node, ast.If) and (
            (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
            or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))

    def visit(node):
        if skip(node):
            for n in node.orelse:
                visit(n)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Project modules ``path`` imports (as :func:`imported_names`), with their parent packages."""
    out = set()
    for mod in imported_names(path, name):
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            if _module_file(".".join(parts[:i])) is not None:
                out.add(".".join(parts[:i]))
    return out


@functools.lru_cache(maxsize=None)
def closure(name: str) -> tuple[str, ...]:
    """Every project module that importing ``name`` can import, transitively (``name``
    included), sorted. Imports inside functions count: they run when the stage does."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_file(mod)
        if path is None:
            continue
        seen.add(mod)
        todo.extend(_imports(path, mod) - seen)
    return tuple(sorted(seen))


def source(path: Path) -> bytes:
    """A module's bytes as hashed (tests replace this to simulate an edit)."""
    return path.read_bytes()


def code_hash(*names: str) -> str:
    """Hash of the code of every module in the closures of ``names``."""
    from pipeline import __version__

    h = hashlib.sha256(__version__.encode())
    for mod in sorted(set().union(*(closure(n) for n in names))):
        h.update(mod.encode() + b"\0" + hashlib.sha256(source(_module_file(mod))).digest())
    return h.hexdigest()[:16]


def fingerprint(section: object, code: str, upstream: str = "") -> str:
    blob = json.dumps({"section": section, "code": code, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
