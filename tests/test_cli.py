"""The command line: one-line errors with exit code 2 before Ray starts; defaults from
--input/--output alone; the console script is the same entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_pipeline import check_invariant

RUN = [sys.executable, str(ROOT / "pipeline" / "run.py")]


def cli(*args, cwd=None, timeout=60):
    t0 = time.time()
    p = subprocess.run([*RUN, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return p, time.time() - t0


def one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "Started a local Ray" not in p.stdout + p.stderr
    return lines[0]


def test_help_documents_the_options():
    p, _ = cli("--help")
    assert p.returncode == 0
    for flag in ("--config", "--input", "--output", "--resume", "--until", "exact_dedup"):
        assert flag in p.stdout


@pytest.mark.parametrize("yaml_text, key", [
    ("input: {path: /tmp}\noutput: /tmp/o\nvalidate: {min_sid: 3}\n", "validate.min_sid: unknown key"),
    ("input: {path: /tmp}\noutput: /tmp/o\nvalidate: {min_side: lots}\n", "validate.min_side"),
    ("input: {path: /tmp}\noutput: /tmp/o\nrun: {seed: [1]}\n", "run.seed"),
    ("input: {path: /tmp, kind: zip}\noutput: /tmp/o\n", "input.kind"),
    ("output: /tmp/o\n", "input: required key is missing"),
    ("input: {path: /tmp}\noutput: /tmp/o\nvalidate: {min_aspect: 7, max_aspect: 2}\n", "min_aspect"),
    ("input: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    p, took = cli("--config", str(cfg))
    line = one_line_error(p)
    assert key in line, line
    assert took < 30


def test_missing_input_and_missing_config_file(tmp_path):
    line = one_line_error(cli("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))[0])
    assert "does not exist" in line and "nope" in line
    line = one_line_error(cli("--config", str(tmp_path / "none.yaml"))[0])
    assert "none.yaml" in line
    assert not (tmp_path / "o").exists()


def test_print_config_lists_every_section():
    p, _ = cli("--print-config")
    assert p.returncode == 0
    for key in ("`input.path`", "`validate.min_side`", "`exact_dedup.placeholder_min_copies`", "`storage.endpoint_url`"):
        assert key in p.stdout


def test_console_script_is_the_same_entry_point():
    exe = ROOT / ".venv" / "bin" / "biocurate"
    if not exe.exists():
        exe = subprocess.run(["which", "biocurate"], capture_output=True, text=True).stdout.strip()
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--until" in p.stdout


@pytest.mark.slow
def test_input_and_output_alone_run_on_defaults_from_any_directory(tmp_path, good, hostile):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name, data in list(good.items())[:4]:
        (corpus / name).write_bytes(data)
    (corpus / "bad.jpg").write_bytes(hostile["truncated.jpg"][0])
    p, _ = cli("--input", str(corpus), "--output", str(tmp_path / "o"), "--until", "validate", cwd=tmp_path,
               timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    check_invariant(tmp_path / "o", [str(p) for p in corpus.iterdir()])
    assert (summary["inputs"], summary["curated"], summary["rejected"]) == (5, 4, 1)
    assert summary["rejected_by_stage"] == {"validate": {"corrupt": 1}}
    assert summary["config"]["validate"]["min_side"] == 80


def test_table_inputs_missing_configured_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,species\n/x.jpg,a\n")
    line = one_line_error(cli("--input", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o"))[0])
    assert "input.uri_column" in line and "'uri'" in line
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uuid": ["a"], "img": [b"x"]}), tmp_path / "t.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{path: {tmp_path / 't.parquet'}, kind: parquet_bytes}}\noutput: {tmp_path / 'o'}\n")
    line = one_line_error(cli("--config", str(cfg))[0])
    assert "input.bytes_column" in line and "'image'" in line


def test_selection_on_a_missing_or_mistyped_column(tmp_path):
    (tmp_path / "m.csv").write_text("uri,species,year\n/x.jpg,a,2001\n")
    for where, msg in ((["{column: genus, eq: Felis}"], "select.where[0].column: 'genus'"),
                       (["{column: year, eq: recent}"], "cannot compare with column 'year'")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"input: {{path: {tmp_path / 'm.csv'}}}\noutput: {tmp_path / 'o'}\n"
                       f"select: {{where: [{where[0]}]}}\n")
        line = one_line_error(cli("--config", str(cfg))[0])
        assert msg in line, line


def test_catalog_key_missing_from_the_input(tmp_path):
    (tmp_path / "m.csv").write_text("uri,species\n/x.jpg,a\n")
    (tmp_path / "cat.csv").write_text("uuid,species\nu1,a\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{path: {tmp_path / 'm.csv'}}}\noutput: {tmp_path / 'o'}\n"
                   f"catalog: {{path: {tmp_path / 'cat.csv'}, key: uuid}}\n")
    line = one_line_error(cli("--config", str(cfg))[0])
    assert "catalog.input_key" in line and "'uuid'" in line


def test_shipped_configs_validate_and_readme_reference_is_current():
    from manifests.config import describe_options, load_config

    for name in ("demo.yaml", "example.yaml", "tol10m.yaml", "tol200m.yaml"):
        cfg = load_config(str(ROOT / "configs" / name))
        assert cfg.embed.models, name
    assert load_config(str(ROOT / "configs" / "example.yaml")).embed.model_for("dedup") == "resnet_v1_50_c1_sscd"
    assert describe_options().strip() in (ROOT / "README.md").read_text()
