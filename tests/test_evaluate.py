"""core.evaluate: base vs tuned scores on real (small) models, batched greedy generation, text rows.

.venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import load_split, prepare_dataset
from core.evaluate import evaluate, greedy_generate
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


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(run_config):
    cfg = run_config()
    tok = load_tokenizer(cfg.model)
    RunDir.create(cfg)
    data = prepare_dataset(cfg.data, tok, cfg.run_dir / "data")
    rows = list(load_split(data.eval_dir))[:6]
    # Cut each prompt shorter by 3 more tokens than the last: six lengths, so a batch needs padding.
    prompts = [list(r["input_ids"][: r["prompt_len"] - 3 * i]) for i, r in enumerate(rows)]
    assert len({len(p) for p in prompts}) == 6 and min(len(p) for p in prompts) > 0
    model = load_model(cfg.model).eval()
    batched = greedy_generate(model, prompts, tok, max_new_tokens=6, batch_size=6)
    single = [greedy_generate(model, [p], tok, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


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
        assert results[side]["loss"] > 0
    assert "exact_match" not in results["delta"] and "loss" in results["delta"]


def test_base_score_is_the_base_even_when_the_adapter_replaces_modules(run_config):
    """modules_to_save (here the head) overwrite base weights when the adapter loads: the base must
    be scored before that, and equal a plain base model's score."""
    from core.evaluate import score_model

    cfg, eval_dir, adapter = _trained_run(run_config, "lora.modules_to_save=[lm_head]", "train.lr=1e-2")
    results = evaluate(cfg, cfg.run_dir, eval_dir, adapter)
    plain = score_model(
        load_model(cfg.model), list(load_split(eval_dir)), load_tokenizer(cfg.model), cfg.eval
    )
    assert results["base"]["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert results["tuned"]["loss"] != pytest.approx(plain["loss"], abs=1e-4)
