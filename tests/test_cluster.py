"""The cluster path for real: Ray's own validation of ray_cluster.yaml, and a
`ray job submit --working-dir .` to a local head started with token auth."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_pipeline import check_invariant

CLUSTER_YAML = ROOT / "ray_cluster.yaml"


def ray_validate(raw: dict) -> dict:
    """What `ray up` checks before it touches AWS (schema, node types, setup commands)."""
    from ray.autoscaler._private.util import fillout_defaults, prepare_config, validate_config

    validate_config(fillout_defaults(copy.deepcopy(raw)))
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_is_accepted_by_rays_validation():
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg = ray_validate(raw)
    types = cfg["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] >= 1 and types["cpu_workers"]["max_workers"] > 0
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("pip install -e ~/biocurate" in c for c in cfg["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(cfg[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    text = CLUSTER_YAML.read_text().lower()
    assert "aws_access_key" not in text and "secret" not in text


def test_rays_validation_rejects_a_broken_cluster_yaml():
    import jsonschema

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_workers"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad)
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        ray_validate(bad)


def quiet_port(taken: set[int]) -> int:
    """A free port outside the kernel's ephemeral range (32768-60999) and Ray's worker ports
    (10002-19999). A port from bind(0) is ephemeral: another Ray on this machine (a parallel
    test) can take it between this choice and the head's bind (CI: the dashboard failed with
    "address already in use")."""
    import random
    import socket

    while True:
        port = random.randint(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port


def _start_head(env: dict, token: str, log: Path) -> tuple[subprocess.Popen, str, str]:
    """A head with token auth on its own ports; tried again (new ports) when one was taken
    after all. Returns the process, its dashboard address and its temp dir."""
    for _ in range(3):
        taken: set[int] = set()
        port, dash = quiet_port(taken), quiet_port(taken)
        ray_tmp = tempfile.mkdtemp(prefix="bcray", dir="/tmp")
        # --block keeps the head in this process group: stopping it stops only this cluster.
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
             # own agent/metrics ports: another Ray on this machine holds the defaults (52365, ...)
             f"--dashboard-agent-listen-port={quiet_port(taken)}", f"--dashboard-agent-grpc-port={quiet_port(taken)}",
             f"--metrics-export-port={quiet_port(taken)}", f"--runtime-env-agent-port={quiet_port(taken)}",
             f"--temp-dir={ray_tmp}"],  # short: Ray's unix socket paths must stay < 108 bytes
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dash}"
        try:
            _wait_http(f"{address}/api/version", {"Authorization": f"Bearer {token}"}, log=log)
            return head, address, ray_tmp
        except _PortTaken:
            _stop(head, ray_tmp)
    raise AssertionError("the head could not bind its ports in 3 tries: " + log.read_text()[-3000:])


class _PortTaken(Exception):
    pass


def _stop(head: subprocess.Popen, ray_tmp: str) -> None:
    try:
        os.killpg(head.pid, 15)
    except ProcessLookupError:
        pass
    head.wait(timeout=60)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_http(url: str, headers: dict, timeout: float = 180, log: Path | None = None) -> None:
    t0 = time.time()
    while True:
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            if log is not None and "address already in use" in log.read_text(errors="replace"):
                raise _PortTaken() from None
            if time.time() - t0 > timeout:
                raise
        time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(tmp_path, good, hostile):
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert len(token) >= 32 and (home / ".ray" / "auth_token").exists()

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in good.items():
        (corpus / name).write_bytes(data)
    for name, (data, _) in hostile.items():
        (corpus / name).write_bytes(data)
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": {"path": str(corpus)}, "output": str(out)}))

    head, address, ray_tmp = _start_head(env, token, tmp_path / "head.log")
    try:
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        denied = subprocess.run(["ray", "job", "list", "--address", address], env=no_token,
                                capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0 and "auth" in (denied.stdout + denied.stderr).lower()
        for _ in range(30):
            job = subprocess.run(
                ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "pipeline/run.py", "--config", str(config)],
                env=env, capture_output=True, text=True, timeout=400)
            # The dashboard answers before its job agent has registered (CI, a loaded machine:
            # "No available agent to submit job, please try again later"): Ray's own advice.
            if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
    except Exception:
        print((tmp_path / "head.log").read_text()[-3000:])
        raise
    finally:
        _stop(head, ray_tmp)
    summary = json.loads((out / "summary.json").read_text())
    check_invariant(out, [str(p) for p in corpus.iterdir()])
    assert summary["inputs"] == len(good) + len(hostile)
    # the good images include one photo in several formats: near-duplicates of each other
    near = sum(summary["rejected_by_stage"].get("near_dedup", {}).values())
    assert summary["rejected"] == len(hostile) + near and near > 0
    assert (out / "curated" / "_SUCCESS").exists()
