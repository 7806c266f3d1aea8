"""data.max_seq_len against the model's context length (core/preflight.py), where `deltatune check` and
the finetune flow's preflight run it; and docs/data.md's YAML examples, parsed by the config model."""

from __future__ import annotations

import re

import pytest
import yaml

from core.config import DataConfig
from core.preflight import PreflightError, check_model, context_length, preflight
from tests.conftest import REPO
from tests.families import family_model


@pytest.mark.parametrize(
    ("family", "key", "n"), [("llama", "max_position_embeddings", 2048), ("gpt2", "n_positions", 64)]
)
def test_max_seq_len_above_the_context_length_names_both_numbers(family, key, n, run_config):
    model = family_model(family, meta=True)
    assert context_length(model.config) == (key, n)
    check_model(run_config(f"data.max_seq_len={n}"), model)  # exactly the context: fits
    with pytest.raises(PreflightError) as exc:
        check_model(run_config(f"data.max_seq_len={n + 1}"), model)
    msg = str(exc.value)
    assert f"data.max_seq_len={n + 1}" in msg and f"context length {n} ({key}" in msg
    assert f"set data.max_seq_len to at most {n}" in msg


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_every_method_checks_the_context_length(method, run_config):
    model = family_model("gpt2", meta=True)
    with pytest.raises(PreflightError, match="context length 64"):
        check_model(run_config(f"method={method}", "data.max_seq_len=65"), model, device_type="cpu")


def test_the_context_problem_comes_with_the_other_problems(run_config):
    model = family_model("llama", meta=True)
    with pytest.raises(PreflightError) as exc:
        check_model(run_config("lora.r=96", "data.max_seq_len=4096"), model)
    assert "lora.r" in str(exc.value) and "context length 2048" in str(exc.value)  # one message, both
    with pytest.raises(PreflightError) as exc:  # a target error too
        check_model(run_config("lora.target_modules=[nope]", "data.max_seq_len=4096"), model)
    assert "nope" in str(exc.value) and "context length 2048" in str(exc.value)


def test_preflight_reads_the_context_from_the_models_config_json(run_config, small_model_dir):
    """The flow's preflight and `deltatune check` call this: the meta model from config.json on disk."""
    import json

    n = json.loads((small_model_dir / "config.json").read_text())["max_position_embeddings"]
    preflight(run_config(f"data.max_seq_len={n}"))
    with pytest.raises(PreflightError, match=f"context length {n} \\(max_position_embeddings"):
        preflight(run_config(f"data.max_seq_len={n * 2}"))


def test_deltatune_check_exits_2_on_a_max_seq_len_the_model_cannot_take(small_model_dir, capsys):
    from flows.cli import main

    code = main(
        ["check", "--set", f"model.name_or_path={small_model_dir}", "--set", "data.max_seq_len=100000"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "data.max_seq_len=100000 is longer than the model's context length" in err


# --- docs/data.md: every ```yaml block is a valid `data:` section (or a whole run config) --------------


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)


def test_every_yaml_example_of_the_data_guide_is_a_valid_config(tmp_path):
    """Each block loads as a run config file does (load_config: YAML 1.2, unknown keys refused)."""
    from core.config import load_config

    blocks = _yaml_blocks((REPO / "docs" / "data.md").read_text())
    assert len(blocks) >= 5  # the guide shows formats, mapping, mixtures, templates, packing
    for i, block in enumerate(blocks):
        assert set(yaml.safe_load(block)) == {"data"}, f"a block is one `data:` section:\n{block}"
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        cfg = load_config(path)
        assert cfg.data == DataConfig.model_validate(yaml.safe_load(block)["data"])


def test_every_setting_the_data_guide_names_is_a_data_config_field():
    text = (REPO / "docs" / "data.md").read_text()
    named = set(re.findall(r"`data\.([a-z_]+)", text))
    assert {"fields", "sources", "truncation", "chat_template", "decode_errors", "packing"} <= named
    assert named <= set(DataConfig.model_fields), sorted(named - set(DataConfig.model_fields))
