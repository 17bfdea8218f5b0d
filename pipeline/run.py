"""biocurate entry point.

    python pipeline/run.py --config my.yaml [--input PATH_OR_URI] [--output DIR] [--resume] [--until STAGE]
    python pipeline/run.py --config my.yaml --output runs/v2 --previous runs/v1      # a periodic refresh
    ray job submit --working-dir . -- python pipeline/run.py --config my.yaml
    biocurate run --input ./images --output ./run  # the same, installed (documented defaults); `run` may be left out
    biocurate --help | --version                   # the commands below, and -v/--verbose for everything Ray prints
    biocurate examples-report --config my.yaml [--labels labels.csv] [--label-sample 200]
    biocurate dedup-report --output RUN_DIR [--labels pairs.csv]   # near-duplicates around the threshold
    biocurate report --output RUN_DIR          # report.html again for a finished run
    biocurate export --output RUN_DIR [--dest DIR] [--format webp] [--max-pixels 1048576] [--shard-size 1000]

Exit codes: 0 done, 2 bad config or unreachable input (one line on stderr, before Ray
starts), 1 the run failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/run.py` from a checkout or a Ray job dir
    # the checkout instead of this script's folder: pipeline/stages must not shadow stages/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from manifests.config import STAGES, ConfigError, PipelineConfig, describe_options, load_config  # noqa: E402


COMMANDS = {  # name -> (module, one line for `biocurate --help`)
    "run": (None, "curate a corpus: curated/ + rejected/ + summary.json + report.html (the default command)"),
    "report": ("pipeline.report", "write report.html again for a finished run"),
    "export": ("pipeline.export", "write a finished run's curated images as webdataset shards"),
    "examples-report": ("pipeline.examples_report", "the non-natural filter's report: its examples, cross-validated"),
    "dedup-report": ("pipeline.dedup_report", "near-duplicate pairs around the threshold (to pick one)"),
}


def version_line() -> str:
    import importlib.metadata as md

    from pipeline import __version__

    parts = []
    for pkg in ("ray", "torch", "pyarrow"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return f"biocurate {__version__} ({', '.join(parts)}; python {sys.version.split()[0]})"


def top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biocurate",
        description="Curate a biodiversity image corpus into a training set (Ray Data, streaming).",
        epilog="Without a command, the arguments are the run's: 'biocurate --config my.yaml' is "
        "'biocurate run --config my.yaml', as is 'python pipeline/run.py --config my.yaml'. "
        "'biocurate COMMAND --help' for each command's options.",
    )
    p.add_argument("--version", action="store_true", help="Print the version (and ray, torch, pyarrow) and exit.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_module, text) in COMMANDS.items():
        sub.add_parser(name, help=text)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return run_parser().parse_args(argv)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biocurate run",
        description="Curate a biodiversity image corpus into a training set (Ray Data, streaming). "
        "Writes <output>/curated, <output>/rejected (every input exactly once across the two), "
        "<output>/summary.json and <output>/report.html.",
        epilog="Without --config, --input and --output run the pipeline on documented defaults. "
        "See --print-config for every option; 'biocurate --help' for the other commands.",
    )
    p.add_argument("--config", help="YAML config file (see README 'Config reference').")
    p.add_argument("--input", help="Overrides input.path: folder, s3://bucket/prefix, manifest, parquet or shards.")
    p.add_argument("--output", help="Overrides output: the run directory (local or s3://).")
    p.add_argument("--resume", action="store_true",
                   help="Reuse finished stages whose fingerprint (config section + code + upstream) matches.")
    p.add_argument("--previous", help="Overrides refresh.previous: refresh against this previous run directory "
                   "(local or s3://; only read). Writes diff/ next to the new manifest.")
    p.add_argument("--until", choices=STAGES, default=STAGES[-1],
                   help="Stop after this stage; the manifest still accounts for every input.")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else local Ray).")
    p.add_argument("--seed", type=int, help="Overrides run.seed.")
    p.add_argument("--print-config", action="store_true", help="Print the config reference and exit.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Show everything Ray prints (by default its expected messages are left out).")
    return p


def check_inputs(cfg: PipelineConfig) -> str:
    """Fail fast, before Ray starts, on inputs that cannot be reached or whose kind is
    ambiguous. Returns the input kind, detected here once (``plan.run`` takes it)."""
    from manifests.io import filesystem

    for path in cfg.input.paths():
        try:
            fs, p = filesystem(path, cfg.storage)
            exists = fs.exists(p)
        except Exception as e:  # noqa: BLE001 - any reachability problem is one line
            raise ConfigError(f"input error: cannot reach {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        if not exists:
            raise ConfigError(f"input error: input.path {path} does not exist")
    from stages import ingest

    try:
        kind = ingest.detect_kind(cfg.input, cfg.storage)
        ingest.check_source(cfg.input, cfg.storage, kind)
        from pipeline.catalog import check_selection

        check_selection(cfg, kind)
    except (ValueError, OSError) as e:
        raise ConfigError(f"input error: {str(e).splitlines()[0]}") from None
    if cfg.refresh.previous:  # a finished run, not this run's own directory
        from pipeline.refresh import load_previous

        load_previous(cfg)
    if cfg.embed.models:  # weights present, dimensions right: before any Ray worker starts
        from pipeline.embedding import aesthetic_active, model_plans

        aesthetic_active(cfg, model_plans(cfg))
        if cfg.near_dedup.enabled and cfg.near_dedup.semantic:
            from stages.near_dedup import semantic_threshold

            semantic_threshold(cfg)  # an explicit dedup model needs a threshold
    return kind


def failure_line(e: BaseException) -> str:
    """One line for the user. A failure inside a Ray worker arrives wrapped (RayTaskError,
    ActorDiedError, ...): the line that names our own error is the useful one."""
    text = str(e)
    for line in text.splitlines():
        for name in ("BackboneError", "ConfigError"):
            if f"{name}:" in line:
                return line[line.index(name):].strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        top_parser().print_help()
        print("\nThe run (the default command):\n")
        print(run_parser().format_help())
        return 0
    if argv and argv[0] == "--version":
        print(version_line())
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    from pipeline import console

    console.install(verbose="-v" in argv or "--verbose" in argv)
    try:
        if command == "run":
            return run_command(argv)
        import importlib

        return importlib.import_module(COMMANDS[command][0]).main(argv)
    finally:
        console.uninstall()


def end_lines(summary: dict, output: str, report: str | None) -> list[str]:
    """What a finished run says, in at most 10 lines: counts, the top reject reasons, wall
    time and images/s, warnings, and where to look."""
    total = summary["timings_s"]["total"]
    rate = summary["inputs"] / total if total > 0 else 0.0
    lines = [f"biocurate: done in {total:.1f} s ({rate:.1f} images/s): {summary['inputs']} inputs -> "
             f"{summary['curated']} curated, {summary['rejected']} rejected"]
    reasons = sorted(((n, stage, reason) for stage, by in (summary.get("rejected_by_stage") or {}).items()
                      for reason, n in by.items()), key=lambda t: (-t[0], t[1], t[2]))
    if reasons:
        top = ", ".join(f"{reason} {n} ({stage})" for n, stage, reason in reasons[:5])
        more = f", {len(reasons) - 5} more reasons" if len(reasons) > 5 else ""
        lines.append(f"biocurate: top rejects: {top}{more}")
    warnings = list(summary.get("warnings") or [])
    skipped = summary.get("input_skipped") or {}
    if skipped.get("count"):
        warnings.append(f"{skipped['count']} files skipped by their name, not read {skipped['by_extension']} "
                        "(input.extensions picks image files)")
    for w in warnings[:3]:
        lines.append(f"biocurate: warning: {w}")
    if len(warnings) > 3:
        lines.append(f"biocurate: {len(warnings) - 3} more warnings in summary.json")
    root = output.rstrip("/")
    lines.append(f"biocurate: manifest {root}/curated and {root}/rejected (summary.json beside them)")
    if report:  # written (a failure was a warning line of its own)
        link = f"{root}/report.html" if "://" in root else (Path(root).resolve() / "report.html").as_uri()
        lines.append(f"biocurate: report {link}")
    return lines


def run_command(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.print_config:
        print(describe_options())
        return 0
    overrides = {}
    if args.input:
        overrides["input.path"] = args.input
    if args.output:
        overrides["output"] = args.output
    if args.address:
        overrides["run.address"] = args.address
    if args.previous:
        overrides["refresh.previous"] = args.previous
    if args.seed is not None:
        overrides["run.seed"] = args.seed
    try:
        cfg = load_config(args.config, overrides)
        kind = check_inputs(cfg)
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2

    from pipeline import plan  # imports ray: only after the config is known to be good

    try:
        summary = plan.run(cfg, until=args.until, resume=args.resume, kind=kind)
    except ConfigError as e:  # found once Ray is up (e.g. a GPU the cluster can never provide)
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback in the log
        import logging

        logging.getLogger("biocurate").exception("run failed")
        print(f"biocurate: run failed: {failure_line(e)}", file=sys.stderr)
        return 1
    for line in end_lines(summary, cfg.output, summary.get("report")):  # warnings: the run's numbers say a
        print(line)                                                     # decision is poor
    return 0




if __name__ == "__main__":
    sys.exit(main())
