"""Are two runs' decisions identical? Compares the curated and rejected manifests of two run
directories row for row (rows matched by id, columns by name; ``decode_ms`` is a timing and
ignored), and prints one JSON line: rows on each side, rows that differ, and the first few
differences.

    python scripts/compare_runs.py RUN_A RUN_B [--ignore COL ...]

Exit 0 when both manifests are equal, 1 otherwise. Used for the before/after check of a
refactor: the same corpus and config through two versions of the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from manifests.io import read_committed_table  # noqa: E402

TIMINGS = ("decode_ms",)


def _rows(run: str, part: str, ignore: set[str]) -> dict[str, dict]:
    table = read_committed_table(f"{run.rstrip('/')}/{part}")
    return {r["id"]: {k: v for k, v in r.items() if k not in ignore} for r in table.to_pylist()}


def compare(a: str, b: str, ignore: set[str]) -> dict:
    out: dict = {}
    for part in ("curated", "rejected"):
        ra, rb = _rows(a, part, ignore), _rows(b, part, ignore)
        diffs = []
        for i in sorted(set(ra) | set(rb)):
            x, y = ra.get(i), rb.get(i)
            if x is None or y is None:
                diffs.append({"id": i, "only_in": "a" if y is None else "b"})
            elif x != y:
                cols = sorted(k for k in set(x) | set(y) if x.get(k, "<absent>") != y.get(k, "<absent>"))
                diffs.append({"id": i, "columns": {k: [x.get(k, "<absent>"), y.get(k, "<absent>")] for k in cols}})
        out[part] = {"a": len(ra), "b": len(rb), "differ": len(diffs), "examples": diffs[:5]}
    out["equal"] = all(out[p]["differ"] == 0 for p in ("curated", "rejected"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--ignore", nargs="*", default=[], help="More columns to leave out of the comparison.")
    args = p.parse_args(argv)
    got = compare(args.a, args.b, {*TIMINGS, *args.ignore})
    print(json.dumps(got, default=str))
    return 0 if got["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
