"""Batched tokenisation: ``Encoder.encode_batch`` gives, row for row, the records, notes and rejects that
``Encoder.encode`` gives (one tokenizer call per segment), for every format, truncation policy and chat
template, with fast and slow tokenizers; and the prepare stage takes ``lost_eos`` from the Encoder alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from core.config import DataConfig
from core.data import DataError, prepare_dataset
from core.data.encode import Encoder, _rust_tokenizer, token_ids
from core.data.errors import Reject
from core.tiny import DEFAULT_CORPUS, train_tokenizer
from tests.test_chat import CONVERSATION, MARKERS

LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods. " * 3

ROWS: dict[str, list] = {
    "alpaca": [
        {"instruction": "Say hello", "output": "Hi"},
        {"instruction": "Say hello", "input": "please", "output": "Hello world!"},
        {"instruction": "Greet", "system": "Be brief.", "output": "Hey"},
        {"instruction": "Tell a story", "output": LONG},  # truncated (or too long under drop)
        {"instruction": LONG, "output": "Yes"},  # the prompt alone is too long
        {"instruction": "Say hi"},  # missing_field:output
        {"instruction": "Say hi", "output": "   "},  # empty_output
        {"instruction": "Say hi", "output": 3},  # wrong_type:output
        ["not", "an", "object"],
        {"instruction": " café ☕ \u00a0", "input": "\t", "output": " naïve 日本語 "},
    ],
    "completion": [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "", "completion": "an empty prompt: no context tokens"},
        {"prompt": "Once upon a time", "completion": LONG},
        {"prompt": LONG, "completion": "end"},
        {"prompt": "x", "completion": ""},  # empty_completion
        {"prompt": None, "completion": "y"},  # missing_field:prompt
    ],
    "text": [
        {"text": "The quick brown fox."},
        {"text": LONG},
        {"text": ""},  # empty_text
        {"text": "   leading and trailing spaces   "},
        {"body": "wrong field"},
    ],
    "chat": [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[1:3]},
        {
            "messages": [
                *CONVERSATION,
                {"role": "user", "content": LONG},
                {"role": "assistant", "content": LONG},
            ]
        },
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},  # no_assistant_turn
        {"messages": []},  # empty_messages
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "Hi"}, "not a message"]},  # bad_message
    ],
}


@pytest.fixture(scope="module")
def fast_tok() -> PreTrainedTokenizerFast:
    """The builtin tiny-llama tokenizer (BOS prepended), with the chat templates' markers as special tokens."""
    tok = train_tokenizer(DEFAULT_CORPUS.read_text(encoding="utf-8"), 1024, model_max_length=256)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


@pytest.fixture(scope="module")
def slow_tok() -> ByT5Tokenizer:
    """A slow (pure Python) tokenizer: bytes as tokens, no BOS, EOS ``</s>``."""
    return ByT5Tokenizer()


def per_row(encoder: Encoder, rows: list) -> list:
    """What ``encode`` gives row by row: (record, notes), or the Reject it raises."""
    out = []
    for line, row in enumerate(rows, 1):
        try:
            out.append(encoder.encode(row, line))
        except Reject as r:
            out.append(r)
    return out


def as_bytes(results: list) -> bytes:
    """Records and notes as JSON (ids stay ints, notes stay in order), a Reject as its reason."""
    plain = [
        {"reject": r.reason} if isinstance(r, Reject) else {"record": r[0], "notes": r[1]} for r in results
    ]
    return json.dumps(plain, ensure_ascii=False).encode()


CASES = [
    (kind, fmt, template, policy)
    for kind in ("fast", "slow")
    for fmt, template in [(f, None) for f in ("alpaca", "completion", "text")]
    + [("chat", t) for t in ("chatml", "zephyr", "llama3", "phi3", "plain")]
    for policy in ("truncate_turns", "truncate", "drop")
    if not (kind == "slow" and template == "llama3")  # llama3 renders bos_token, which ByT5 has not
]


@pytest.mark.parametrize("kind, fmt, template, policy", CASES)
def test_encode_batch_gives_the_records_notes_and_rejects_of_encode(
    kind, fmt, template, policy, fast_tok, slow_tok
):
    tok = fast_tok if kind == "fast" else slow_tok
    # The long rows are cut, the others fit (ByT5's tokens are bytes: its rows are longer).
    max_len = {"fast": 72 if fmt == "chat" else 48, "slow": 160}[kind]
    cfg = DataConfig(format=fmt, chat_template=template, truncation=policy, max_seq_len=max_len)
    encoder = Encoder(cfg, tok)
    rows = ROWS[fmt]
    expected = per_row(encoder, rows)
    got = encoder.encode_batch([(row, line) for line, row in enumerate(rows, 1)])
    assert len(got) == len(rows)
    assert as_bytes(got) == as_bytes(expected)
    for g, e in zip(got, expected, strict=True):
        assert type(g) is type(e)
        if not isinstance(g, Reject):
            assert all(type(x) is int for x in g[0]["input_ids"] + g[0]["labels"])
            assert isinstance(g[1], tuple)
    # The batch had every kind of row this policy makes: the comparison above is not of empty lists.
    notes = {n for r in got if not isinstance(r, Reject) for n in r[1]}
    reasons = {r.reason for r in got if isinstance(r, Reject)}
    assert len(reasons) >= 2 and any(not isinstance(r, Reject) and not r[1] for r in got)
    if policy == "drop":
        assert "too_long" in reasons and not notes
    else:
        assert "truncated" in notes
    if fmt == "chat" and policy == "truncate_turns":
        assert "turns_dropped" in notes
    # A batch of one, and an empty batch.
    assert as_bytes(encoder.encode_batch([(rows[0], 1)])) == as_bytes(expected[:1])
    assert encoder.encode_batch([]) == []


def test_a_template_that_refuses_a_row_of_a_batch_names_that_rows_line(fast_tok):
    encoder = Encoder(DataConfig(format="chat", chat_template="gemma"), fast_tok)
    ok = {"messages": CONVERSATION[1:]}  # gemma has no system role
    assert not isinstance(encoder.encode_batch([(ok, 6)])[0], Reject)
    with pytest.raises(DataError) as err:
        encoder.encode_batch([(ok, 6), ({"messages": CONVERSATION}, 7), (ok, 8)])
    msg = str(err.value)
    assert "line 7" in msg and "System role not supported" in msg and "data.chat_template" in msg


TEXTS = [
    "Hello world!",
    "",
    " leading space",
    "<|im_start|>user\nHi<|im_end|>\n",  # special tokens inside the text
    "</s>",
    "café ☕ 日本語 \u00a0\t\n\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "",
]


def per_text(tok, texts: list[str]) -> list[list[int]]:
    return [list(tok(t, add_special_tokens=False)["input_ids"]) if t else [] for t in texts]


def test_token_ids_are_those_of_one_call_per_text(fast_tok, slow_tok):
    # The fast tokenizer goes to its Rust tokenizer directly; the slow one through its own call.
    assert _rust_tokenizer(fast_tok) is fast_tok.backend_tokenizer and _rust_tokenizer(slow_tok) is None
    for tok in (fast_tok, slow_tok):
        assert token_ids(tok, TEXTS) == per_text(tok, TEXTS)
        assert token_ids(tok, ["", ""]) == [[], []] and token_ids(tok, []) == []

    # What transformers resets before it encodes is not taken as it is: the tokenizer is called instead.
    tok = copy.deepcopy(fast_tok)
    tok.backend_tokenizer.enable_truncation(max_length=4)
    assert _rust_tokenizer(tok) is None
    assert token_ids(tok, TEXTS) == per_text(tok, TEXTS) and max(map(len, token_ids(tok, TEXTS))) > 4
    split = copy.deepcopy(fast_tok)
    split.split_special_tokens = True  # "<|im_start|>" as text, not as its special token
    ids = token_ids(split, TEXTS)
    assert ids == per_text(split, TEXTS) and ids[3] != token_ids(fast_tok, TEXTS)[3]


def test_prepare_takes_lost_eos_from_the_encoder_not_from_the_last_token(tmp_path: Path, fast_tok):
    """zephyr ends each turn with EOS + "\\n": truncate_turns keeps whole turns, so the kept row still ends
    with its end of turn. The stage used to add ``lost_eos`` to every truncated row whose last token is not
    EOS (here "\\n")."""
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(f), format="chat", chat_template="zephyr", max_seq_len=80, eval_fraction=0.0)
    record, notes = Encoder(cfg, fast_tok).encode(rows[0], 1)
    assert set(notes) == {"truncated", "turns_dropped"} and record["input_ids"][-1] != fast_tok.eos_token_id
    p = prepare_dataset(cfg, fast_tok, tmp_path / "out", cache_dir=tmp_path / "cache")
    report = json.loads(p.report_path.read_text())
    assert report["note_counts"].get("truncated") == 1 and report["note_counts"].get("turns_dropped") == 1
    assert "lost_eos" not in report["note_counts"]
