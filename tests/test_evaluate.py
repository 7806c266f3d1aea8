"""core.evaluate: base vs tuned scores on real (small) models, batched greedy generation with stop strings,
the task metric with per-row samples, text rows.

.venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.data import load_split, prepare_dataset
from core.evaluate import cut_at_stop, evaluate, greedy_generate, score_model
from core.metrics import exact_match, rouge_l
from core.modeling import load_model, load_tokenizer
from core.run import RunDir
from core.train import train


def _trained_run(run_config, *overrides: str):
    """Prepare and train 3 LoRA steps; return (cfg, eval split, adapter dir)."""
    cfg = run_config("train.max_steps=3", "eval.generation_rows=6", "eval.batch_size=4", *overrides)
    RunDir.create(cfg)
    data = prepare_dataset(cfg.data, load_tokenizer(cfg.model), cfg.run_dir / "data")
    adapter = train(cfg, cfg.run_dir, data.train_dir).output_dir
    return cfg, data.eval_dir, adapter


def _six_prompts(run_config):
    """Six eval prompts of six lengths (each cut 3 tokens shorter than the last), the model, the tokenizer."""
    cfg = run_config()
    tok = load_tokenizer(cfg.model)
    RunDir.create(cfg)
    data = prepare_dataset(cfg.data, tok, cfg.run_dir / "data")
    rows = list(load_split(data.eval_dir))[:6]
    prompts = [list(r["input_ids"][: r["prompt_len"] - 3 * i]) for i, r in enumerate(rows)]
    return prompts, load_model(cfg.model).eval(), tok


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(run_config):
    prompts, model, tok = _six_prompts(run_config)
    assert len({len(p) for p in prompts}) == 6 and min(len(p) for p in prompts) > 0  # a batch needs padding
    batched = greedy_generate(model, prompts, tok, max_new_tokens=6, batch_size=6)
    single = [greedy_generate(model, [p], tok, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_stop_strings_cut_batched_generation_as_one_prompt_at_a_time(run_config):
    prompts, model, tok = _six_prompts(run_config)
    free = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6)
    said = [t for t in free if len(t) > 4]
    assert said, free  # the model must say something for a stop string to cut
    # One stop string from inside a generation (it must be cut there), one that may or may not occur.
    stop = [said[0][2:4], "\n"]
    batched = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6, stop=stop)
    single = [
        greedy_generate(model, [p], tok, max_new_tokens=12, batch_size=1, stop=stop)[0] for p in prompts
    ]
    assert batched == single
    # Greedy decoding is deterministic: stopping early gives what the free run says, up to the stop string.
    assert batched == [cut_at_stop(t, stop) for t in free] != free
    assert not any(s in t for t in batched for s in stop)


def test_a_stop_string_is_looked_for_in_the_continuation_only(run_config):
    """One that starts in the prompt and ends in the continuation is not in the continuation: no stop (a
    check over the whole sequence, as generate's own stop_strings makes, would end the row there)."""
    prompts, model, tok = _six_prompts(run_config)
    free = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6)
    k = next(i for i, t in enumerate(free) if len(t) > 2)
    straddle = tok.decode(prompts[k][-1:])[-1:] + free[k][:2]
    assert straddle not in free[k] and straddle in tok.decode(prompts[k]) + free[k]
    stopped = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6, stop=[straddle])
    assert stopped[k] == free[k]


def test_generation_ends_once_every_row_met_a_stop_string_or_eos(run_config):
    prompts, model, tok = _six_prompts(run_config)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    free = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6)
    free_calls = len(calls)
    calls.clear()
    stop = sorted({t[:1] for t in free if t})  # every row that says anything stops at its first character
    stopped = greedy_generate(model, prompts, tok, max_new_tokens=12, batch_size=6, stop=stop)
    assert stopped == [""] * 6
    # One forward per generated token: the free batch runs to its longest row's EOS, the stopped one ends
    # as soon as each row's first token is out.
    assert max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in free) > 2
    assert len(calls) <= 2 < free_calls, (len(calls), free_calls)


def test_eval_json_scores_base_and_tuned_on_the_same_rows(run_config):
    cfg, eval_dir, adapter = _trained_run(run_config)
    results = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    on_disk = json.loads(Path(cfg.run_dir, "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["rows"] == len(load_split(eval_dir))
    for side in ("base", "tuned"):
        s = results[side]
        assert s["generated"] == min(6, results["rows"]) and 0.0 <= s["exact_match"] <= 1.0
        assert s["perplexity"] == pytest.approx(2.718281828 ** s["loss"], rel=1e-6)
    assert results["base"]["loss"] != results["tuned"]["loss"]  # the adapter is on for one side only
    assert results["delta"]["loss"] == pytest.approx(results["tuned"]["loss"] - results["base"]["loss"])


def test_eval_json_has_the_task_metric_and_per_row_samples(run_config):
    cfg, eval_dir, adapter = _trained_run(run_config, "eval.metric=rouge_l", "eval.stop=['\\n']")
    results = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    assert json.loads(Path(cfg.run_dir, "eval.json").read_text())["tuned"]["task_metric_name"] == "rouge_l"
    for side in ("base", "tuned"):
        s = results[side]
        samples = s["samples"]
        assert len(samples) == s["generated"] == min(6, results["rows"]) > 0
        for row in samples:
            assert set(row) == {"prompt", "reference", "prediction", "score", "match"}
            assert (
                row["score"] == rouge_l(row["prediction"], row["reference"]) and "\n" not in row["prediction"]
            )
            assert row["match"] == (exact_match(row["prediction"], row["reference"]) == 1.0)
        assert s["task_metric_name"] == "rouge_l"
        assert s["task_metric"] == pytest.approx(sum(r["score"] for r in samples) / len(samples))
        assert s["exact_match"] == pytest.approx(sum(r["match"] for r in samples) / len(samples))
    delta = results["delta"]
    assert delta["task_metric"] == pytest.approx(
        results["tuned"]["task_metric"] - results["base"]["task_metric"]
    )
    # eval.sample_rows keeps the first N rows only; the means still cover every generated row.
    rows, tok = list(load_split(eval_dir)), load_tokenizer(cfg.model)
    few = score_model(load_model(cfg.model), rows, tok, cfg.eval.model_copy(update={"sample_rows": 2}))
    assert (
        few["samples"] == results["base"]["samples"][:2]
        and few["task_metric"] == results["base"]["task_metric"]
    )


def test_eval_fingerprint_covers_metric_regex_and_stop_and_keeps_the_default_one():
    from core.config import EvalConfig
    from core.evaluate import eval_fingerprint
    from core.run import digest

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    default = eval_fingerprint(rows, EvalConfig())
    # What it was before eval.regex and eval.stop existed: versions published then stay comparable.
    settings = {"generation_rows": 64, "max_new_tokens": 32, "metric": "exact_match"}
    assert default == digest({"rows": [[[1, 2, 3], [-100, 2, 3]]], "settings": settings})
    others = [
        EvalConfig(metric="rouge_l"),
        EvalConfig(metric="regex", regex=r"(\d+)"),
        EvalConfig(metric="regex", regex=r"(\w+)"),
        EvalConfig(stop=["\n"]),
        EvalConfig(sample_rows=3),  # not a setting that changes a score
    ]
    fps = [eval_fingerprint(rows, c) for c in others]
    assert len(set(fps[:4]) | {default}) == 5 and fps[4] == default


def test_plain_text_rows_are_scored_by_loss_without_generation(run_config, tmp_path):
    lines = [json.dumps({"text": f"the {c} fox sat by the {w} lake."}) for c in ("red", "blue", "pink", "gray")
             for w in ("still", "cold", "wide", "dark", "deep")]  # fmt: skip
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    cfg, eval_dir, adapter = _trained_run(
        run_config, "data.format=text", f"data.path={corpus}", "data.eval_fraction=0.2"
    )
    results = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    for side in ("base", "tuned"):
        assert results[side]["exact_match"] is None and results[side]["generated"] == 0
        assert results[side]["task_metric"] is None and results[side]["samples"] == []
        assert results[side]["loss"] > 0
    assert not {"exact_match", "task_metric"} & set(results["delta"]) and "loss" in results["delta"]


def test_base_score_is_the_base_even_when_the_adapter_replaces_modules(run_config):
    """modules_to_save (here the head) overwrite base weights when the adapter loads: the base must
    be scored before that, and equal a plain base model's score."""
    cfg, eval_dir, adapter = _trained_run(run_config, "lora.modules_to_save=[lm_head]", "train.lr=1e-2")
    results = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    plain = score_model(
        load_model(cfg.model), list(load_split(eval_dir)), load_tokenizer(cfg.model), cfg.eval
    )
    assert results["base"]["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert results["tuned"]["loss"] != pytest.approx(plain["loss"], abs=1e-4)


def test_merged_model_and_forgetting_are_scored_on_the_same_rows(run_config, tmp_path):
    """eval.json holds base, tuned and merged scores with the merged-vs-tuned delta, and the forgetting:
    base and tuned loss on general text, computed here by hand from the same rows."""
    from core.adapter import load_adapter
    from core.data import text_rows
    from core.evaluate import forgetting_rows, heldout_loss
    from core.lora import merge_and_unload

    general = tmp_path / "general.txt"
    general.write_text(
        "the fox sat on the mat\n\nname the last word\n\nx\n\nred blue green lake river hill\n"
    )
    cfg, eval_dir, adapter = _trained_run(
        run_config, f"eval.forgetting_path={general}", "eval.forgetting_tail=0.5"
    )
    assert text_rows(str(general), tail=0.5) == ["x", "red blue green lake river hill"]
    merged_dir = cfg.run_dir / "merged"
    model = load_model(cfg.model)
    load_adapter(model, adapter)
    merge_and_unload(model).save_pretrained(merged_dir)

    out = evaluate(cfg, cfg.run_dir, eval_dir, adapter, merged=merged_dir)
    assert json.loads(RunDir(cfg.run_dir).eval_report.read_text())["merged"]["loss"] == out["merged"]["loss"]
    assert abs(out["merged_vs_tuned"]["loss"]) < 1e-4 and out["merged_vs_tuned"]["task_metric"] == 0.0
    assert [s["prediction"] for s in out["merged"]["samples"]] == [
        s["prediction"] for s in out["tuned"]["samples"]
    ]

    tok = load_tokenizer(cfg.model)
    rows = forgetting_rows(cfg, tok)
    assert len(rows) == 2 and all(r["labels"] == r["input_ids"] for r in rows)  # "x" is BOS + 1 token
    base_loss = heldout_loss(load_model(cfg.model), rows, tok.pad_token_id, 4)["loss"]
    f = out["forgetting"]
    assert f["rows"] == 2 and f["base_loss"] == pytest.approx(base_loss, abs=1e-6)
    assert f["delta"] == pytest.approx(f["tuned_loss"] - f["base_loss"]) and f["delta"] != 0.0
    assert f["merged_loss"] == pytest.approx(f["tuned_loss"], abs=1e-4)


def test_a_forgetting_file_without_text_is_a_clear_error(tmp_path):
    from core.data import DataError, text_rows

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(DataError, match="holds no text"):
        text_rows(str(empty))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="rows.jsonl:2: expected a row with a string field 'text'"):
        text_rows(str(rows))
    with pytest.raises(DataError, match="does not exist"):
        text_rows(str(tmp_path / "missing.txt"))


_KNOWN: set[str] = set()


def known_prediction(prediction: str, reference: str) -> float:
    """A user metric (eval.metric: tests.test_evaluate:known_prediction): 1 for an answer seen before."""
    return float(prediction in _KNOWN)


def test_a_merged_model_that_answers_worse_fails_the_stage_and_keeps_eval_json(run_config):
    from core.adapter import load_adapter
    from core.evaluate import MergedModelError
    from core.lora import merge_and_unload

    metric = "eval.metric=tests.test_evaluate:known_prediction"
    cfg, eval_dir, adapter = _trained_run(run_config, metric, "merge.max_metric_drop=0.1")
    first = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    _KNOWN.update(s["prediction"] for s in first["tuned"]["samples"])
    assert first["tuned"]["generated"] == len(first["tuned"]["samples"]) == 6

    model = load_model(cfg.model)
    load_adapter(model, adapter)
    broken = merge_and_unload(model)
    with torch.no_grad():
        broken.lm_head.weight.neg_()  # every greedy token becomes the least likely one
    broken.save_pretrained(cfg.run_dir / "broken")
    with pytest.raises(MergedModelError, match=r"a drop of 1\.0000 over merge.max_metric_drop=0.1"):
        evaluate(cfg, cfg.run_dir, eval_dir, adapter, merged=cfg.run_dir / "broken")
    kept = json.loads(RunDir(cfg.run_dir).eval_report.read_text())
    assert kept["tuned"]["task_metric"] == 1.0 and kept["merged"]["task_metric"] == 0.0
