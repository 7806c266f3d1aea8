"""The deltatune command line: config errors, show-config, make-tiny-model (run as real subprocesses);
prepare --show (in-process: it starts no Prefect server)."""

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


# --- deltatune prepare --show: the prepare stage without training, rows shown as the loss sees them ---


def _prepare(tmp_path, small_model_dir, *args: str) -> list[str]:
    return [
        "prepare",
        "--set",
        f"model.name_or_path={small_model_dir}",
        "--set",
        f"output_dir={tmp_path / 'runs'}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        *args,
    ]


def test_prepare_show_prints_rows_with_the_trained_tokens_marked(tmp_path, small_model_dir, capsys):
    """The demo data prepared into the run directory as the prepare stage does; rows decoded with the
    trained tokens (label != -100) between ⟦ ⟧ (stdout is no terminal here), counts per row; nothing trains."""
    from core.data import IGNORE_INDEX, load_split
    from core.modeling import load_tokenizer
    from core.run import RunDir
    from flows.cli import main

    assert main(_prepare(tmp_path, small_model_dir, "--show", "3")) == 0
    out = capsys.readouterr().out
    rd = RunDir(tmp_path / "runs" / "demo")
    report = json.loads((rd.data_dir(0) / "prepare_report.json").read_text())
    assert f"{report['train']} train / {report['eval']} eval rows" in out and report["train"] > 0
    assert "rejected: 0" in out and "cache: built" in out
    assert f"report: {rd.data_dir(0) / 'prepare_report.json'}" in out
    assert rd.config().data.cache_dir == str(tmp_path / "cache")  # the run's resolved config, written

    train = load_split(rd.data_dir(0) / "train")
    tok = load_tokenizer(rd.config().model)
    rows = out.split("--- train row ")[1:]
    assert len(rows) == 3
    for i, shown in enumerate(rows):
        ids, labels = train[i]["input_ids"], train[i]["labels"]
        trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert shown.startswith(f"{i + 1} of {len(train)} ---\n")
        assert f"line {train[i]['source_line']}: {len(ids)} tokens, {len(trained)} trained" in shown
        assert shown.count("⟦") == shown.count("⟧") == 1  # alpaca: one trained span, the response
        span = shown[shown.index("⟦") + 1 : shown.index("⟧")]
        assert span == tok.decode(trained, skip_special_tokens=False) and span.endswith(tok.eos_token)
        assert "\x1b[" not in shown
    assert not rd.checkpoints.exists() and not rd.summary.exists() and not rd.metrics.exists()
    assert not rd.trained_dir("lora").exists()

    # Again: the cache is hit, and --color always marks the span in colour instead of brackets.
    assert main(_prepare(tmp_path, small_model_dir, "--show", "1", "--color", "always")) == 0
    again = capsys.readouterr().out
    assert "cache: hit" in again and again.count("--- train row ") == 1
    assert "⟦" not in again and "\x1b[1;32m" in again and "\x1b[0m" in again


def test_prepare_reports_truncated_rows_and_shows_them(tmp_path, small_model_dir, capsys):
    from flows.cli import main

    assert main(_prepare(tmp_path, small_model_dir, "--set", "data.max_seq_len=40", "--show", "2")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "demo" / "data" / "prepare_report.json").read_text())
    truncated, lost = report["note_counts"]["truncated"], report["note_counts"]["lost_eos"]
    assert truncated > 100  # more than the report's capped list of lines: the count is exact
    assert f"truncated: {truncated} row(s) longer than max_seq_len=40 ({lost} lost their EOS)" in out
    assert all(" 40 tokens" in row and "no EOS at the end" in row for row in out.split("--- train row ")[1:])


def test_prepare_refuses_a_max_seq_len_above_the_context_length(tmp_path, small_model_dir, capsys):
    from flows.cli import main

    code = main(_prepare(tmp_path, small_model_dir, "--set", "data.max_seq_len=100000", "--show", "1"))
    assert code == 2
    err = capsys.readouterr().err
    assert "data.max_seq_len=100000 is longer than the model's context length" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs" / "demo").exists()  # nothing written


def test_render_sample_marks_each_packed_row_separately(small_model_dir):
    """A packed row (position_ids restarting at 0 per row, core/data/packing.py) shows as its rows."""
    from core.config import load_config
    from core.data.show import render_sample
    from core.modeling import load_tokenizer

    tok = load_tokenizer(load_config(overrides=[f"model.name_or_path={small_model_dir}"]).model)
    a = tok("the fox", add_special_tokens=False)["input_ids"]
    b = tok("the lake", add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id, *a, tok.eos_token_id, tok.bos_token_id, *b]
    labels = [-100, *[-100] * len(a), tok.eos_token_id, -100, *b]
    positions = [*range(len(a) + 2), *range(len(b) + 1)]
    text = render_sample({"input_ids": ids, "labels": labels, "position_ids": positions}, tok, color=False)
    first, second = text.split("\n" + "packed row 2/2: ")
    assert first.startswith(f"packed row 1/2: {len(a) + 2} tokens, 1 trained, ends with EOS\n")
    assert first.endswith(f"the fox⟦{tok.eos_token}⟧")
    assert second.startswith(f"{len(b) + 1} tokens, {len(b)} trained, no EOS at the end\n")
    assert second.endswith("⟦the lake⟧")


def test_prepare_that_refuses_the_data_exits_1_naming_its_report(tmp_path, small_model_dir, capsys):
    from flows.cli import main

    assert main(_prepare(tmp_path, small_model_dir, "--set", "data.max_seq_len=20", "--show", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    report = tmp_path / "runs" / "demo" / "data" / "prepare_report.json"
    assert err.startswith("deltatune: prepare failed: DataError: ") and "too_long" in err
    assert err.endswith(f"(report: {report})") and report.is_file()


def _trained_runs(ids, labels) -> list[list[int]]:
    """The ids of each contiguous run of trained positions (label != -100)."""
    from itertools import groupby

    from core.data import IGNORE_INDEX

    pairs = zip(ids, labels, strict=True)
    return [[t for t, _ in run] for trained, run in groupby(pairs, lambda p: p[1] != IGNORE_INDEX) if trained]


def test_prepare_show_marks_every_assistant_turn_of_a_chat(tmp_path, small_model_dir, capsys):
    """Multi-turn chat: one ⟦…⟧ per assistant turn, each exactly the decoded ids the loss trains on."""
    from core.data import load_split
    from core.modeling import load_tokenizer
    from core.run import RunDir
    from flows.cli import main

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"name {i}"},
                {"role": "assistant", "content": "fox lake"},
                {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": f"pink {i}"},
            ]
        }
        for i in range(10)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--set", f"data.path={path}", "--set", "data.format=chat", "--show", "2"]
    assert main(_prepare(tmp_path, small_model_dir, *args)) == 0
    shown = capsys.readouterr().out.split("--- train row ")[1:]
    rd = RunDir(tmp_path / "runs" / "demo")
    train, tok = load_split(rd.data_dir(0) / "train"), load_tokenizer(rd.config().model)
    assert len(shown) == 2
    for i, text in enumerate(shown):
        runs = _trained_runs(train[i]["input_ids"], train[i]["labels"])
        assert len(runs) == 2  # the two assistant turns
        assert f"{len(train[i]['input_ids'])} tokens, {sum(map(len, runs))} trained" in text
        spans = [part.split("⟧")[0] for part in text.split("⟦")[1:]]
        assert spans == [tok.decode(run, skip_special_tokens=False) for run in runs]
        assert "fox lake" in spans[0] and f"pink {train[i]['source_line'] - 1}" in spans[1]


def test_prepare_show_renders_the_rows_of_a_packed_sequence(tmp_path, small_model_dir, capsys):
    from core.data import load_split
    from core.run import RunDir
    from flows.cli import main

    assert main(_prepare(tmp_path, small_model_dir, "--set", "data.packing=true", "--show", "1")) == 0
    out = capsys.readouterr().out
    row = load_split(RunDir(tmp_path / "runs" / "demo").data_dir(0) / "train")[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) > 1  # short demo rows: several fit one sequence of max_seq_len=64
    lengths = [b - a for a, b in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True)]
    for k, n in enumerate(lengths):
        assert f"packed row {k + 1}/{len(lengths)}: {n} tokens, " in out
    assert out.count("⟦") == len(lengths)  # one response per packed alpaca row


def test_prepare_summary_counts_rejected_rows_by_reason_with_their_lines(tmp_path, small_model_dir, capsys):
    from flows.cli import main

    good = [json.dumps({"instruction": f"name {w}", "output": w}) for w in ("fox", "lake", "pink", "hen")]
    lines = [*good, "{not json", json.dumps({"instruction": "x"}), good[0], "[1, 2]"]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(_prepare(tmp_path, small_model_dir, "--set", f"data.path={path}")) == 0
    out = capsys.readouterr().out
    assert f"prepared {path}: " in out and "(5 of 8 rows kept)" in out
    assert (
        "rejected: 3 (malformed_json: 1, e.g. line 5; missing_field:output: 1, e.g. line 6; "
        "not_an_object: 1, e.g. line 8)"
    ) in out
    assert "duplicates: 1 (kept: data.drop_duplicates=false)" in out
    assert "--- train row" not in out  # --show 0 (the default): the summary only
