"""The command line as a user meets it: one CLI with subcommands, live progress on a
terminal (a real pseudo-terminal), periodic progress lines elsewhere, and none of Ray's
expected messages on a clean run."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import console, progress
from pipeline.run import COMMANDS, end_lines, main
from tests.test_pipeline import check_invariant

ROOT = Path(__file__).resolve().parent.parent

# What a clean run printed before (the list): none of it may appear.
RAY_NOISE = [
    "RayDeprecationWarning", "ray_remote_args", "core_worker.cc", "constructor arguments in the object store",
    "issue_detector", "used up to", "does not have any available CPUs", "Token authentication is enabled",
    "Started a local Ray instance", "Progress bars disabled",
]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "report", "export", "examples-report", "dedup-report"):
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", out, re.M), (name, out)
    assert set(COMMANDS) == {"run", "report", "export", "examples-report", "dedup-report"}


def test_version(capsys):
    assert main(["--version"]) == 0
    from pipeline import __version__

    assert re.fullmatch(rf"biocurate {re.escape(__version__)} \(ray 2\.60\.0, torch \S+, pyarrow \S+; python \S+\)\n",
                        capsys.readouterr().out)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommands_help_works_without_ray(command):
    code = ("import sys; from pipeline.run import main\n"
            "try:\n    main([sys.argv[1], '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('RAY_IMPORTED', 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"usage: biocurate {command}" in r.stdout
    assert "RAY_IMPORTED False" in r.stdout, f"'biocurate {command} --help' imported ray"


def test_run_without_a_command_is_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "x.yaml", "--help"])
    assert e.value.code == 0 and "usage: biocurate run" in capsys.readouterr().out


def test_end_lines_are_at_most_ten_and_name_what_to_open():
    summary = {"inputs": 1000, "curated": 700, "rejected": 300, "timings_s": {"total": 50.0},
               "rejected_by_stage": {"validate": {"corrupt": 5, "too_small": 40, "empty": 1, "bad_aspect": 2},
                                     "near_dedup": {"perceptual_duplicate": 150, "semantic_duplicate": 90},
                                     "exact_dedup": {"exact_duplicate": 12}},
               "warnings": [f"warning {k}" for k in range(6)],
               "input_skipped": {"count": 3, "by_extension": {".txt": 3}}}
    lines = end_lines(summary, "/data/run", "/data/run/report.html")
    assert len(lines) <= 10
    assert lines[0] == "biocurate: done in 50.0 s (20.0 images/s): 1000 inputs -> 700 curated, 300 rejected"
    assert lines[1].startswith("biocurate: top rejects: perceptual_duplicate 150 (near_dedup), "
                               "semantic_duplicate 90 (near_dedup), too_small 40 (validate)")
    assert lines[1].endswith("2 more reasons")
    assert "biocurate: 4 more warnings in summary.json" in lines
    assert lines[-1] == "biocurate: report file:///data/run/report.html"
    s3 = end_lines(summary, "s3://b/run/", None)
    assert not any("report" in line and "report.html" in line for line in s3)
    assert "biocurate: manifest s3://b/run/curated and s3://b/run/rejected (summary.json beside them)" in s3


def test_status_line_rate_and_eta():
    p = progress.StageProgress("embed", started=100.0, done=500, total=2000, step_started=100.0)
    assert progress.status_line(p, 110.0) == "biocurate: embed:  500/2,000 rows  50.0 rows/s  ETA 30s  (10s)"
    assert progress.duration(3725) == "1h02m" and progress.duration(125) == "2m05s"
    p.peak = 2000
    assert progress.done_line(p, 140.0) == "biocurate: embed done: 2,000 rows in 40s (50.0 rows/s)"
    # no rows out yet (a shuffle starting): it says so, with no empty field
    idle = progress.StageProgress("exact_dedup", started=100.0)
    assert progress.status_line(idle, 130.0) == "biocurate: exact_dedup:  running  (30s)"
    for line in (progress.status_line(p, 110.0), progress.status_line(idle, 3825.0), progress.done_line(p, 140.0)):
        assert progress.is_progress(line), line
    for line in ("biocurate: run failed: BackboneError: backbone tiny gives 192-d outputs (its dim)",
                 "biocurate: run failed: TimeoutError: no answer (12s)",
                 "biocurate: warning: near_dedup: 5 of 33 semantic removals are within 0.02 (2s)"[:-5],
                 "biocurate: config error: embed.batch_size must be > 0"):
        assert not progress.is_progress(line), line


def test_gpu_wait_line_names_who_holds_the_gpus():
    other = progress.gpu_wait_line("embed", 1, 1, 1, 0, 1, 60)
    assert "(another job holds them): nothing runs until one is free" in other
    ours = progress.gpu_wait_line("embed", 2, 4, 1, 0, 2, 60)  # 4 actors, 2 GPUs: ours hold both
    assert "this run's other actors hold them" in ours and "it runs on the others meanwhile" in ours
    free = progress.gpu_wait_line("embed", 1, 1, 1, 1, 1, 60)
    assert "to be placed, with 1 of 1 GPUs free" in free and "for a GPU" not in free


STARVED_PUMP = """
import sys, time
from pipeline import console

class Starved(console.StderrFilter):  # its pump thread never gets to run (a loaded machine)
    JOIN_S = 0.2
    def _pump(self):
        time.sleep(30)

f = Starved()
print("Started a local Ray instance.", file=sys.stderr)  # expected: dropped
print("biocurate: config error: input.path is missing", file=sys.stderr)
sys.stderr.write("no newline at the end")
f.close()
"""


def test_the_last_lines_survive_a_pump_that_never_ran():
    # CI, two test processes on 2 cores: a config error's run exited 2 with an empty stderr
    r = subprocess.run([sys.executable, "-c", STARVED_PUMP], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "biocurate: config error: input.path is missing\nno newline at the end", r.stderr


def test_expected_messages_are_filtered_and_others_pass():
    assert console.expected("2026-12-07 07:57:57,155 WARNING dataset.py:8601 -- Warning: The Ray cluster currently "
                            "does not have any available CPUs. The Dataset job will hang unless more CPUs are freed up.")
    assert not console.expected("biocurate: warning: near_dedup: 5 of 33 semantic removals are within 0.02")
    assert not console.expected("Traceback (most recent call last):")


def _corpus(tmp_path: Path, photos) -> Path:
    from PIL import Image

    from pipeline.testdata import images

    src = tmp_path / "in"
    src.mkdir()
    for name, arr in photos.items():
        img = Image.fromarray(arr)
        w, h = img.size
        for k in range(3):
            crop = img.crop((k * w // 10, k * h // 10, k * w // 10 + w * 2 // 3, k * h // 10 + h * 2 // 3))
            (src / f"{name}_{k}.jpg").write_bytes(images.encode(crop, "JPEG", quality=90))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "input": {"path": str(src)}, "output": str(tmp_path / "run"),
        "embed": {"models": [{"name": "mobilenet_v2_imagenet"}], "batch_size": 4},
        "run": {"progress_interval_s": 1, "batch_size": 4, "read_batch_size": 4}}))
    return cfg


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}


@pytest.mark.slow
def test_under_a_terminal_progress_is_live_and_ray_is_quiet(tmp_path, photos):
    cfg = _corpus(tmp_path, photos)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pseudo-terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "pipeline/run.py", "--config", str(cfg)], _env())
    out, deadline = b"", time.time() + 480
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, text[-3000:]
    redrawn = re.findall(r"\r\x1b\[Kbiocurate: ingest -> validate -> embed:[^\r\n]*", text)
    assert len(redrawn) >= 3, text[-3000:]  # the live line, redrawn in place
    assert any(re.search(r"\d+/\d+ rows|\d+ rows", line) for line in redrawn), redrawn
    assert re.search(r"biocurate: ingest -> validate -> embed done: 24 rows in (\d+m)?\d+s", text), text[-3000:]
    assert "biocurate: done in" in text and "biocurate: report file://" in text
    for noise in RAY_NOISE:
        assert noise not in text, (noise, text[-3000:])
    check_invariant(tmp_path / "run", [str(p) for p in (tmp_path / "in").iterdir()])


@pytest.mark.slow
def test_without_a_terminal_progress_is_a_line_every_interval(tmp_path, photos):
    cfg = _corpus(tmp_path, photos)
    r = subprocess.run([sys.executable, "pipeline/run.py", "--config", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr  # no terminal codes in a log
    periodic = re.findall(r"^biocurate: ingest -> validate -> embed: .*\(\d+s\)$", r.stderr, re.M)
    assert len(periodic) >= 2, r.stderr  # run.progress_interval_s: 1, and the pass takes longer
    assert re.search(r"^biocurate: exact_dedup done: ", r.stderr, re.M)
    lines = r.stdout.strip().splitlines()
    assert 3 <= len(lines) <= 10 and lines[0].startswith("biocurate: done in"), r.stdout
    assert "{" not in r.stdout  # summary.json is not dumped
    for noise in RAY_NOISE:
        assert noise not in r.stdout + r.stderr, noise
    check_invariant(tmp_path / "run", [str(p) for p in (tmp_path / "in").iterdir()])
    # -v: everything Ray says (a run up to validate is enough for Ray to speak)
    verbose = subprocess.run([sys.executable, "pipeline/run.py", "--config", str(cfg), "-v", "--until", "validate",
                              "--output", str(tmp_path / "run_v")], capture_output=True, text=True, cwd=ROOT,
                             env=_env(), timeout=480)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Started a local Ray instance" in verbose.stderr


GPU_WAIT = """
import sys, threading, time
import ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a logical GPU
from pipeline import console, progress
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
ctx.custom_execution_callback_classes.append(progress.RowsCallback)
progress.RowsCallback.GPU_POLL_S = 0.5
shown = progress.PROGRESS = progress.Progress(console.Console(1), interval_s=1000, gpu_wait_warn_s=3)

class Model:  # loads for `delay` s, holding its GPU
    def __init__(self, delay):
        time.sleep(delay)
    def __call__(self, batch):
        return batch

@ray.remote(num_gpus=1, num_cpus=0)
class Holder:  # another job's actor, holding the only GPU
    def ping(self):
        return 1

def embed(delay):
    shown.start("embed")
    n = ray.data.range(8).map_batches(Model, fn_constructor_kwargs={"delay": delay}, batch_size=4, num_gpus=1, num_cpus=0,
                                      compute=ray.data.ActorPoolStrategy(size=1)).count()
    shown.finish()
    return n

print("ROWS", embed(6), "WARNINGS", len(shown.warnings), flush=True)  # a slow load is no wait
h = Holder.remote()
ray.get(h.ping.remote())
threading.Timer(10, lambda: ray.kill(h)).start()
print("ROWS", embed(0), "WARNINGS", len(shown.warnings), flush=True)
# before the plan: a GPU the autoscaler is starting (here: one freed after 8 s)
from pipeline import embedding
h = Holder.remote()
ray.get(h.ping.remote())
threading.Timer(8, lambda: ray.kill(h)).start()
console.CONSOLE = console.Console(1)
embedding.wait_for_gpu(1, 60)
print("GOT A GPU", flush=True)
"""


def test_a_gpu_held_by_another_job_is_said_once_while_waiting():
    r = subprocess.run([sys.executable, "-c", GPU_WAIT], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert [line for line in out if line.startswith("ROWS")] == ["ROWS 8 WARNINGS 0", "ROWS 8 WARNINGS 1"], r.stdout
    warned = [line for line in out if line.startswith("biocurate: warning:")]
    assert len(warned) == 1, r.stdout
    assert re.fullmatch(r"biocurate: warning: embed: 1 of 1 GPU actors \(1 GPU each\) have waited \d+s for a GPU; "
                        r"the cluster has 0 of 1 GPUs free \(another job holds them\): nothing runs until one is "
                        r"free", warned[0]), warned[0]
    # said while waiting (before the stage's end), not after it
    assert out.index(warned[0]) < out.index("ROWS 8 WARNINGS 1")
    waiting = out[out.index("ROWS 8 WARNINGS 1") + 1:]
    assert waiting[0] == ("biocurate: waiting up to embed.gpu_timeout_s=60 s for a GPU (1 per actor): the cluster "
                          "has 1 now, its autoscaler can add up to 0"), waiting
    got = re.fullmatch(r"biocurate: a GPU is available after (\d+) s", waiting[1])
    assert got and 7 <= int(got.group(1)) <= 60 and waiting[2] == "GOT A GPU", waiting  # freed at 8 s (10 s on a loaded CI)
