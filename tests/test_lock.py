"""The locks scripts/bootstrap.sh installs from agree with pyproject.toml's ranges and with
the environment this suite runs in; every file they name is pinned by its sha256."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"


def locked(path: Path) -> dict[str, tuple[str, str | None, list[str]]]:
    """name -> (version, marker, hashes) of a hashed requirements file."""
    out: dict = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *opts = re.split(r"\s+(?=--hash=)", line)
        req = Requirement(spec)
        (version,) = [s.version for s in req.specifier if s.operator == "=="]
        out[canonicalize_name(req.name)] = (version, str(req.marker) if req.marker else None,
                                            [o.split(":", 1)[1] for o in opts])
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_declared_dependency_is_locked_within_its_range():
    lock = locked(REQ / "test.lock")
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is declared in pyproject.toml but not locked (run scripts/lock.sh)"
        assert req.specifier.contains(lock[name][0], prereleases=True), \
            f"locked {name}=={lock[name][0]} is outside pyproject.toml's {req} (run scripts/lock.sh)"


def test_every_locked_file_is_pinned_by_hash():
    for path in REQ.glob("*.lock"):
        lock = locked(path)
        assert lock, path
        for name, (_version, _marker, hashes) in lock.items():
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{path.name}: {name}"


def test_the_no_deps_packages_are_the_ones_asked_for():
    asked = {canonicalize_name(Requirement(line).name): Requirement(line)
             for line in (REQ / "data.in").read_text().splitlines() if line and not line.startswith("#")}
    lock = locked(REQ / "data.lock")
    assert set(lock) == set(asked)
    for name, req in asked.items():
        assert req.specifier.contains(lock[name][0])


def test_torch_and_torchvision_are_held_as_a_pair():
    lock = locked(REQ / "test.lock")
    held = {canonicalize_name(Requirement(line).name): Requirement(line)
            for line in (REQ / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")}
    assert set(held) == {"torch", "torchvision"}
    for name, req in held.items():
        assert req.specifier.contains(lock[name][0])


def test_this_environment_is_the_lock():
    """What bootstrap installed is what the locks say (a stale .venv is caught here)."""
    env = default_environment()
    wrong = []
    for path in (REQ / "test.lock", REQ / "data.lock"):
        for name, (version, marker, _hashes) in locked(path).items():
            if marker and not Requirement(f"x; {marker}").marker.evaluate(env):
                continue
            try:
                have = md.version(name)
            except md.PackageNotFoundError:
                have = None
            if have is None or have.split("+")[0] != version.split("+")[0]:
                wrong.append(f"{name}: locked {version}, installed {have}")
    assert not wrong, wrong
