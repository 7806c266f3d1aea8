"""Prepare stage: masks checked by hand, per-line rejection report, split, content-hash cache, S3 source."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import core.data.prepare
from core.config import DataConfig
from core.data import (
    PROMPT_TEMPLATE_ALPACA,
    PROMPT_TEMPLATE_ALPACA_NO_INPUT,
    DataError,
    collate,
    load_split,
    prepare_dataset,
)
from tests.s3_fixtures import DUMMY_SECRET

CORPUS = [
    "### Instruction:\nSay hello to the world.\n\n### Input:\nplease\n\n### Response:\nHello world!",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.\n",
    "Write a short poem about the sea and the sky, with rhymes.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _make_tokenizer(*, adds_bos: bool, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    """BOS prepended by the tokenizer's own post-processor (like Llama)."""
    return _make_tokenizer(adds_bos=True)


@pytest.fixture(scope="session")
def tok_plain() -> PreTrainedTokenizerFast:
    """No BOS added (like GPT-2/Qwen)."""
    return _make_tokenizer(adds_bos=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "default-cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows that are str are written verbatim (to make malformed lines); others as JSON."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prep(tmp_path: Path, tokenizer, out: str = "out", **cfg):
    cfg.setdefault("eval_fraction", 0.0)
    return prepare_dataset(DataConfig(**cfg), tokenizer, tmp_path / out, cache_dir=tmp_path / "cache")


def rows_of(path: Path | None) -> list[dict]:
    assert path is not None
    return list(load_split(path))


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# Masking and templates
# ----------------------------------------------------------------------------------------------------


def test_alpaca_masking_hand_checked(tmp_path, tok):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "Say hello", "input": "please", "output": "Hello world!"}]
    )
    p = prep(tmp_path, tok, path=str(f))
    (row,) = rows_of(p.train_dir)
    prompt = "### Instruction:\nSay hello\n\n### Input:\nplease\n\n### Response:\n"  # written out by hand
    assert row["prompt"] == prompt == PROMPT_TEMPLATE_ALPACA.format(instruction="Say hello", input="please")
    assert row["reference"] == "Hello world!"
    assert row["source_line"] == 1
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # Prompt and response tokenised separately: no BPE merge across the mask boundary.
    expected = [bos] + enc(tok, prompt) + enc(tok, "Hello world!") + [eos]
    assert row["input_ids"] == expected
    k = 1 + len(enc(tok, prompt))
    assert row["prompt_len"] == k
    assert len(row["labels"]) == len(row["input_ids"])
    assert row["labels"][:k] == [-100] * k
    assert row["labels"][k:] == row["input_ids"][k:]
    assert tok.decode(row["labels"][k:]) == "Hello world!</s>"
    assert p.num_train == 1 and p.num_eval == 0 and p.eval_dir is None


def test_no_input_template_and_no_bos_tokenizer(tmp_path, tok_plain):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Say hello", "output": "Hi"},
            {"instruction": "Say hello", "input": "", "output": "Hi"},
        ],
    )
    rows = rows_of(prep(tmp_path, tok_plain, path=str(f)).train_dir)
    prompt = "### Instruction:\nSay hello\n\n### Response:\n"
    assert prompt == PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")
    for row in rows:
        assert row["prompt"] == prompt
        assert row["input_ids"] == enc(tok_plain, prompt) + enc(tok_plain, "Hi") + [tok_plain.eos_token_id]
        n = len(enc(tok_plain, prompt))
        assert row["labels"] == [-100] * n + enc(tok_plain, "Hi") + [tok_plain.eos_token_id]


def test_mask_prompt_false_and_no_eos(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hello", "output": "Hi"}])
    (row,) = rows_of(prep(tmp_path, tok, path=str(f), mask_prompt=False, add_eos=False).train_dir)
    assert row["input_ids"][-1] != tok.eos_token_id
    assert row["labels"] == [-100] + row["input_ids"][1:]  # only BOS is never a target


def test_completion_and_text_formats(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Two plus two is", "completion": " four."}])
    (row,) = rows_of(prep(tmp_path, tok, out="c", path=str(f), format="completion").train_dir)
    n = 1 + len(enc(tok, "Two plus two is"))
    assert row["labels"][:n] == [-100] * n
    assert tok.decode(row["labels"][n:]) == " four.</s>"
    assert (row["prompt"], row["reference"]) == ("Two plus two is", " four.")

    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    (row,) = rows_of(prep(tmp_path, tok, out="t", path=str(f), format="text").train_dir)
    assert row["input_ids"] == [tok.bos_token_id] + enc(tok, "The quick brown fox.") + [tok.eos_token_id]
    assert row["labels"] == [-100] + row["input_ids"][1:]  # every token trained
    assert row["prompt"] == "" and row["prompt_len"] == 0  # no prompt: scored by loss, never generated


CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "Six."},
    ]
}


def _trained_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def test_chat_fallback_template_trains_assistant_turns_only(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION, {"messages": [{"role": "user", "content": "hi"}]}])
    p = prep(tmp_path, tok, path=str(f), format="chat")
    (row,) = rows_of(p.train_dir)
    # Issue 10: each assistant turn trains what the template renders after it (the fallback's "\n"), and
    # EOS comes once, at the end of the sequence (it was "Four.</s>Six.</s>": an EOS after every turn).
    assert _trained_text(tok, row) == "Four.\nSix.\n</s>"
    expected_prompt = (
        "<|system|>\nBe brief.\n<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.\n"
        "<|user|>\nAnd three?\n<|assistant|>\n"
    )
    assert row["prompt"] == expected_prompt and row["reference"] == "Six."
    assert tok.decode(row["input_ids"][row["prompt_len"] :]) == "Six.\n</s>"
    report = json.loads(p.report_path.read_text())
    assert report["rejected"] == {"no_assistant_turn": [2]}


def test_chat_with_tokenizer_template(tmp_path):
    tok_chat = _make_tokenizer(adds_bos=True, chat_template=CHAT_TEMPLATE)
    f = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    (row,) = rows_of(prep(tmp_path, tok_chat, path=str(f), format="chat").train_dir)
    # The template closes each assistant turn with </s>: trained, and no second EOS appended.
    assert _trained_text(tok_chat, row) == "Four.</s>\nSix.</s>\n"
    assert row["input_ids"].count(tok_chat.eos_token_id) == len(CONVERSATION["messages"])  # one per turn
    assert row["input_ids"][0] == tok_chat.bos_token_id
    msgs = CONVERSATION["messages"]
    assert row["prompt"] == tok_chat.apply_chat_template(msgs[:4], tokenize=False, add_generation_prompt=True)
    full = tok_chat.apply_chat_template(msgs, tokenize=False)
    assert tok_chat.decode(row["input_ids"], skip_special_tokens=False) == "<s>" + full


# ----------------------------------------------------------------------------------------------------
# Validation report
# ----------------------------------------------------------------------------------------------------


def test_bad_rows_reported_by_reason_with_line_numbers(tmp_path, tok, caplog):
    good = {"instruction": "Say hello", "output": "Hi"}
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            good,  # 1
            '{"instruction": "Say hello", "output": ',  # 2 malformed
            {"instruction": "Say hello"},  # 3
            "",  # 4 blank: skipped, not counted
            {"instruction": "Say hello", "output": "   "},  # 5
            {"instruction": 7, "output": "Hi"},  # 6
            good,  # 7
            ["not", "an", "object"],  # 8
            {"instruction": "Say hello", "output": None},  # 9 null is missing, never passed on as None
            '{"instruction": "x", "output": "y"} trailing',  # 10 malformed
        ],
    )
    with caplog.at_level(logging.WARNING, logger="core.data"):
        p = prep(tmp_path, tok, path=str(f), max_reject_fraction=1.0)
    report = json.loads(p.report_path.read_text())
    assert report["rejected"] == {
        "malformed_json": [2, 10],
        "missing_field:output": [3, 9],
        "empty_output": [5],
        "wrong_type:instruction": [6],
        "not_an_object": [8],
    }
    assert (report["total"], report["kept"], report["train"]) == (9, 2, 2)
    assert report["fingerprint"] == p.fingerprint
    assert [r["source_line"] for r in rows_of(p.train_dir)] == [1, 7]
    assert any("7 of 9 rows rejected" in r.getMessage() for r in caplog.records)


def test_mostly_bad_file_fails_unless_allowed(tmp_path, tok):
    rows = [{"instruction": "Say hi", "output": "Hi"}] + [{"instruction": "x"}] * 2
    f = write_jsonl(tmp_path / "half.jsonl", rows)
    with pytest.raises(DataError, match=r"2 of 3 rows were rejected .* data.max_reject_fraction=0.5"):
        prep(tmp_path, tok, path=str(f))
    assert prep(tmp_path, tok, path=str(f), max_reject_fraction=0.7).num_train == 1


def test_the_reject_threshold_is_judged_on_a_cache_hit_too(tmp_path, tok, caplog):
    """The same file passes at 0.7, then fails at 0.5 from the warm cache (it used to pass: the check ran
    only when the cache was built), and the >10 % warning is logged on the hit as well."""
    rows = [{"instruction": "Say hi", "output": "Hi"}] + [{"instruction": "x"}] * 2
    f = write_jsonl(tmp_path / "half.jsonl", rows)
    warm = prep(tmp_path, tok, path=str(f), max_reject_fraction=0.7)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.data"):
        assert (
            prep(tmp_path, tok, out="again", path=str(f), max_reject_fraction=0.7).fingerprint
            == warm.fingerprint
        )
    assert json.loads((tmp_path / "again" / "prepare_report.json").read_text())["cache_hit"] is True
    assert any("2 of 3 rows rejected" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"2 of 3 rows were rejected .* data.max_reject_fraction=0.5"):
        prep(tmp_path, tok, out="strict", path=str(f))
    # The verdict's evidence is kept: the report of the refused prepare is in its run directory.
    assert json.loads((tmp_path / "strict" / "prepare_report.json").read_text())["rejected_counts"] == {
        "missing_field:output": 2
    }


def test_all_bad_file_raises_with_reasons_and_lines(tmp_path, tok):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}, {"instruction": "b"}, "{oops"])
    with pytest.raises(DataError) as e:
        prep(tmp_path, tok, path=str(f))
    msg = str(e.value)
    assert "bad.jsonl" in msg and "all 3 rows were rejected" in msg
    assert "missing_field:output: 2 row(s), e.g. line(s) 1, 2" in msg and "malformed_json" in msg


def test_chat_rows_read_as_alpaca_suggest_the_chat_format(tmp_path, tok):
    f = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION, CONVERSATION])
    with pytest.raises(DataError, match=r"The rows have a 'messages' field: set data.format=chat\?"):
        prep(tmp_path, tok, path=str(f))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_raises(tmp_path, tok, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl is empty: no rows found.*instruction"):
        prep(tmp_path, tok, path=str(f))


def test_missing_local_file_is_not_treated_as_hub_id(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        prep(tmp_path, tok, path=str(tmp_path / "nope.jsonl"))


def test_hub_id_offline_raises_clear_error(tmp_path, tok, monkeypatch):
    def offline(*args, **kwargs):  # what load_dataset raises with no network, without waiting for DNS
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hub dataset id.*need network access.*\.jsonl"):
        prep(tmp_path, tok, path="some-org/some-dataset")


def test_truncation_and_too_long(tmp_path, tok):
    long_instruction = "The quick brown fox jumps over the lazy dog. " * 6
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Say hello", "output": "The quick brown fox jumps over the lazy dog. " * 4},  # 1
            {"instruction": long_instruction, "output": "Hi"},  # 2: the prompt alone fills max_seq_len
            {"instruction": "Say hello", "output": "Hi"},  # 3: fits
        ],
    )
    short_prompt = 1 + len(enc(tok, PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")))
    max_len = short_prompt + 6  # room for "Hi" + EOS, not for the long output
    assert 1 + len(enc(tok, PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction=long_instruction))) >= max_len
    assert len(enc(tok, "Hi")) + 1 < 6 < len(enc(tok, "The quick brown fox jumps over the lazy dog. " * 4))
    p = prep(tmp_path, tok, path=str(f), max_seq_len=max_len)
    report = json.loads(p.report_path.read_text())
    assert report["rejected"] == {"too_long": [2]}
    assert report["truncated"] == [1]
    rows = {r["source_line"]: r for r in rows_of(p.train_dir)}
    assert len(rows[1]["input_ids"]) == len(rows[1]["labels"]) == max_len
    assert rows[1]["input_ids"][-1] != tok.eos_token_id  # cut inside the response
    assert rows[3]["input_ids"][-1] == tok.eos_token_id and len(rows[3]["input_ids"]) < max_len


# ----------------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------------


def _numbered(tmp_path: Path, n: int, name: str = "d.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"instruction": f"Say {i}", "output": f"Hi {i}"} for i in range(n)])


def _split_lines(p) -> tuple[list[int], list[int]]:
    return [r["source_line"] for r in rows_of(p.train_dir)], [r["source_line"] for r in rows_of(p.eval_dir)]


def test_split_is_deterministic_and_disjoint(tmp_path, tok):
    f = _numbered(tmp_path, 20)
    a = prepare_dataset(
        DataConfig(path=str(f), eval_fraction=0.25, seed=3), tok, tmp_path / "a", cache_dir=tmp_path / "c1"
    )
    b = prepare_dataset(
        DataConfig(path=str(f), eval_fraction=0.25, seed=3), tok, tmp_path / "b", cache_dir=tmp_path / "c2"
    )
    train, evals = _split_lines(a)
    assert (train, evals) == _split_lines(b)  # rebuilt from scratch in another cache: same split
    assert len(evals) == 5 and a.num_eval == 5 and a.num_train == 15
    assert not set(train) & set(evals) and sorted(train + evals) == list(range(1, 21))
    assert evals != list(range(1, 6))  # shuffled, not the head of the file
    c = prepare_dataset(
        DataConfig(path=str(f), eval_fraction=0.25, seed=4), tok, tmp_path / "c", cache_dir=tmp_path / "c1"
    )
    assert _split_lines(c)[1] != evals


def test_tiny_fraction_still_gives_one_eval_row(tmp_path, tok):
    p = prep(tmp_path, tok, path=str(_numbered(tmp_path, 2)), eval_fraction=0.01)
    assert (p.num_train, p.num_eval) == (1, 1)


def test_eval_path_is_used_instead_of_a_split(tmp_path, tok):
    train = _numbered(tmp_path, 4)
    evals = write_jsonl(
        tmp_path / "e.jsonl", [{"instruction": "Eval", "output": "E"}, {"instruction": "Bad"}]
    )
    p = prep(tmp_path, tok, path=str(train), eval_path=str(evals), eval_fraction=0.5)
    assert (p.num_train, p.num_eval) == (4, 1)
    assert [r["reference"] for r in rows_of(p.eval_dir)] == ["E"]
    report = json.loads(p.report_path.read_text())
    assert report["eval_source"]["rejected"] == {"missing_field:output": [2]}
    assert report["eval_source"]["source"] == str(evals)


# ----------------------------------------------------------------------------------------------------
# Content-addressed cache
# ----------------------------------------------------------------------------------------------------


def test_cache_hit_skips_tokenisation(tmp_path, tok, monkeypatch):
    f = _numbered(tmp_path, 10)
    first = prep(tmp_path, tok, out="run1", path=str(f), eval_fraction=0.2)
    cached = tmp_path / "cache" / "data" / first.fingerprint
    assert (cached / "prepare_report.json").is_file()
    mtime = (cached / "train").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenised on a cache hit")

    monkeypatch.setattr(core.data.prepare, "encode_rows", boom)
    same_bytes = tmp_path / "copy.jsonl"  # another name, same content: the same data
    same_bytes.write_bytes(f.read_bytes())
    second = prep(tmp_path, tok, out="run2", path=str(same_bytes), eval_fraction=0.2)
    assert second.fingerprint == first.fingerprint
    assert (cached / "train").stat().st_mtime_ns == mtime
    assert rows_of(second.train_dir) == rows_of(first.train_dir)
    report = json.loads(second.report_path.read_text())
    assert report["cache_hit"] is True and report["source"] == str(same_bytes)
    assert (second.num_train, second.num_eval) == (8, 2)


def test_data_cache_dir_precedence(tmp_path, monkeypatch):
    from core.data import data_cache_dir

    cfg = DataConfig(cache_dir=str(tmp_path / "cfg"))
    assert data_cache_dir(cfg, tmp_path / "arg") == tmp_path / "arg" / "data"
    assert data_cache_dir(cfg) == tmp_path / "cfg" / "data"
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "env"))
    assert data_cache_dir(DataConfig()) == tmp_path / "env" / "data"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache_dir(DataConfig()) == tmp_path / "home" / ".cache" / "deltatune" / "data"


def test_cache_miss_on_content_config_or_tokenizer_change(tmp_path, tok, tok_plain):
    f = _numbered(tmp_path, 5)
    base = prep(tmp_path, tok, path=str(f)).fingerprint
    assert prep(tmp_path, tok, path=str(f), max_seq_len=64).fingerprint != base
    assert prep(tmp_path, tok, path=str(f), mask_prompt=False).fingerprint != base
    assert prep(tmp_path, tok_plain, path=str(f)).fingerprint != base
    f.write_text(f.read_text().replace("Hi 4", "Hi four"))
    changed = prep(tmp_path, tok, path=str(f))
    assert changed.fingerprint != base
    assert json.loads(changed.report_path.read_text())["cache_hit"] is False
    assert rows_of(changed.train_dir)[-1]["reference"] == "Hi four"
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == sorted(
        p.name for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".tmp")
    )  # no temp dirs left behind


# ----------------------------------------------------------------------------------------------------
# Other sources: S3 over HTTP, JSON list, CSV
# ----------------------------------------------------------------------------------------------------


def test_s3_source_through_moto(tmp_path, tok, moto_s3, caplog):  # noqa: F811
    import s3fs

    f = _numbered(tmp_path, 6)
    fs = s3fs.S3FileSystem(**moto_s3.storage_options, skip_instance_cache=True)
    uri = f"s3://{moto_s3.bucket}/data/train.jsonl"
    fs.put_file(str(f), uri)
    # A run config may not hold credentials: key/secret come from the AWS_* env the fixture sets.
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}}
    with caplog.at_level(logging.DEBUG, logger="core.data"):
        remote = prep(tmp_path, tok, out="s3", path=uri, storage_options=options)
    local = prep(tmp_path, tok, out="local", path=str(f))
    assert remote.fingerprint == local.fingerprint  # the same bytes
    assert rows_of(remote.train_dir) == rows_of(local.train_dir) and remote.num_train == 6
    assert json.loads(remote.report_path.read_text())["source"] == uri
    assert DUMMY_SECRET not in remote.report_path.read_text() + caplog.text
    with pytest.raises(DataError, match="does not exist"):
        prep(
            tmp_path,
            tok,
            path=f"s3://{moto_s3.bucket}/missing.jsonl",
            storage_options=options,
        )


def test_json_list_and_csv_sources_keep_line_numbers(tmp_path, tok):
    j = tmp_path / "d.json"
    j.write_text(
        '[\n  {"instruction": "Say hello", "output": "Hi"},\n  {"instruction": "x"},\n  {"output": "y"}\n]\n'
    )
    report = json.loads(
        prep(tmp_path, tok, out="j", path=str(j), max_reject_fraction=1.0).report_path.read_text()
    )
    assert report["rejected"] == {"missing_field:output": [3], "missing_field:instruction": [4]}

    c = tmp_path / "d.csv"
    c.write_text('instruction,input,output\nSay hello,,Hi\n"multi\nline",,Yo\nno output,,\n')
    p = prep(tmp_path, tok, out="c", path=str(c))
    assert json.loads(p.report_path.read_text())["rejected"] == {"empty_output": [5]}
    rows = rows_of(p.train_dir)
    assert [r["source_line"] for r in rows] == [2, 3]
    assert rows[1]["prompt"] == PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="multi\nline")


# ----------------------------------------------------------------------------------------------------
# Loading and batching
# ----------------------------------------------------------------------------------------------------


def test_collate_right_pads():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt": "x"},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
    ]
    out = collate(batch, pad_id=0)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, 5) for k in ("input_ids", "labels", "attention_mask")
    }
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 5]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(v.dtype == torch.long for v in out.values())
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


def test_collate_on_a_prepared_split(tmp_path, tok):
    p = prep(tmp_path, tok, path=str(_numbered(tmp_path, 3)))
    ds = load_split(p.train_dir)
    out = collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    lengths = [len(r["input_ids"]) for r in ds]
    assert out["input_ids"].shape == (3, max(lengths))
    assert out["attention_mask"].sum(1).tolist() == lengths


def test_load_split_rejects_a_non_dataset_dir(tmp_path):
    with pytest.raises(DataError, match="run the prepare stage"):
        load_split(tmp_path)
