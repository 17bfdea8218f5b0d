"""The GPU mode of bench/embed.py must run on a bare box (torch, Pillow, no Ray): smoke-run
it on CPU with a handful of images. No timing is asserted here (benchmarks print ratios)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_mode_runs_without_ray(tmp_path):
    # A copy of the script alone (no repository on the path), as on a bare GPU box.
    script = tmp_path / "embed.py"
    script.write_text((ROOT / "bench" / "embed.py").read_text())
    (tmp_path / "data").mkdir()
    for f in sorted((ROOT / "bench" / "data").glob("*.jpg"))[:2]:
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
    code = ("import sys, runpy; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, str(script), "--gpu", "--device", "cpu", "--n", "4",
                        "--batch", "2", "--workers", "1", "--warmup", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["mode"] == "gpu" and result["images"] == 4 and result["model_img_per_s"] > 0
    assert result["e2e_img_per_s"] > 0 and "2 distinct JPEGs" in result["decode"]
