"""The deltatune command line: config errors, show-config, make-tiny-model (run as real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_show_config_resolves_the_demo_with_overrides():
    out = _cli("show-config", "--set", "lora.r=4", "--set", "train.lr=1e-4")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["name"] == "demo" and cfg["lora"]["r"] == 4 and cfg["train"]["lr"] == 1e-4


def test_bad_config_exits_2_naming_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nlora:\n  rnak: 8\ntrain:\n  lr: -1\n")
    out = _cli("run", str(bad))
    assert out.returncode == 2
    assert "lora.rnak: unknown key" in out.stderr and "train.lr" in out.stderr
    assert "Traceback" not in out.stderr
    missing = _cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_make_tiny_model_builds_a_loadable_model(tmp_path):
    out = _cli("make-tiny-model", str(tmp_path / "m"), "--pretrain-steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads((tmp_path / "m" / "tiny_model.json").read_text())
    assert info["recipe"]["pretrain_steps"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size % 32 == 0


def test_failed_run_ends_on_one_line_naming_the_problem(tmp_path):
    """A model path that does not exist fails in the first stage, and the last line says what to fix."""
    out = _cli(
        "run",
        "--set",
        f"model.name_or_path={tmp_path / 'no-such-model'}",
        "--set",
        f"output_dir={tmp_path / 'runs'}",
        "--set",
        f"publish.store={tmp_path / 'artifacts'}",
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("deltatune: run failed: FileNotFoundError: model.name_or_path=")
    assert "does not exist" in last and "hub id" in last
    assert not (tmp_path / "runs" / "demo" / "metrics.jsonl").exists()


def test_set_without_equals_says_how_to_write_it():
    out = _cli("show-config", "--set", "train.lr", "1e-4")
    assert out.returncode == 2
    assert "--set takes KEY=VALUE in one argument, e.g. --set train.lr=1e-4 (got 'train.lr')" in out.stderr


@pytest.mark.slow
def test_sweep_prints_the_table_and_the_recommendation(run_config, tmp_path):
    """`deltatune sweep CONFIG` as a user runs it: a temporary Prefect server, two variants, the table."""
    from core.config import to_yaml

    variants = [{"name": f"r{r}", "overrides": [f"lora.r={r}"]} for r in (1, 2)]
    cfg = run_config(
        "name=clisweep", "train.max_steps=2", "eval.max_eval_rows=4", f"sweep.variants={json.dumps(variants)}"
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(to_yaml(cfg))
    out = _cli("sweep", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| r")]
    assert [line.split(" | ")[0] for line in table] == ["| r1", "| r2"]
    assert "**Recommended: `r" in out.stdout
    paths = json.loads(out.stdout[out.stdout.index("{") :])["paths"]
    assert Path(paths["csv"]).is_file() and Path(paths["quality"]).is_file()
