"""Chat data: built-in and configured templates, end-of-turn handling, train == eval prompts, truncation
policies, last-turn-only training, system prompts, field mapping (ShareGPT, OpenAI), template errors.

Rows go through the Encoder, the one interface the prepare stage calls, with the builtin tiny-llama
tokenizer (core/tiny.py; BOS prepended, EOS ``</s>``), which has no chat template of its own.
"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
from transformers import PreTrainedTokenizerFast

from core.config import DataConfig
from core.data.encode import IGNORE_INDEX, Encoder
from core.data.errors import DataError, Reject
from core.data.formats import PROMPT_TEMPLATE_ALPACA_NO_INPUT
from core.data.templates import BUILTIN_TEMPLATES, template_key
from core.tiny import DEFAULT_CORPUS, train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Six."},
]
# The end-of-turn and header markers are special tokens in the models that use them.
MARKERS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|end|>",
]


@pytest.fixture(scope="session")
def tiny_tok() -> PreTrainedTokenizerFast:
    """The builtin tiny-llama tokenizer, as core.tiny builds it (no chat template)."""
    return train_tokenizer(DEFAULT_CORPUS.read_text(encoding="utf-8"), 1024, model_max_length=256)


@pytest.fixture(scope="session")
def chat_tok(tiny_tok) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(tiny_tok)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    return tok


@pytest.fixture(scope="session")
def chatml_tok(chat_tok) -> PreTrainedTokenizerFast:
    """A tokenizer whose own chat template is ChatML (as Qwen2's)."""
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tok


def render(tok, messages: list[dict], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encoder(tok, **cfg) -> Encoder:
    cfg.setdefault("format", "chat")
    return Encoder(DataConfig(**cfg), tok)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(tok, record: dict) -> str:
    return tok.decode([t for t in record["labels"] if t != IGNORE_INDEX])


def with_bos(tok, ids: list[int]) -> list[int]:
    """What the Encoder puts first: BOS, unless the template rendered it already."""
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


# ----------------------------------------------------------------------------------------------------
# End of turn: the template's own marker is trained, EOS only ends the sequence; train == eval prompt
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected_trained",
    [
        ("chatml", "Four.<|im_end|>\nSix.<|im_end|>\n</s>"),
        ("llama3", "Four.<|eot_id|>Six.<|eot_id|></s>"),
        (None, "Four.\nSix.\n</s>"),  # the plain fallback: its end of turn is the newline
    ],
)
def test_train_and_eval_prompts_render_the_same_and_eos_ends_the_sequence_only(
    chat_tok, template, expected_trained
):
    """It used to append EOS after every assistant turn, so training saw 'Four.</s>\\n<|user|>' while the
    eval prompt had 'Four.\\n<|user|>'."""
    e = encoder(chat_tok, chat_template=template)
    record, notes = e.encode({"messages": CONVERSATION}, 1)
    ids, eos = record["input_ids"], chat_tok.eos_token_id
    assert notes == ()
    assert trained(chat_tok, record) == expected_trained
    assert ids.count(eos) == 1 and ids[-1] == eos  # once, at the end of the whole sequence
    # The eval prompt (rendered up to the last answer with the generation prompt) tokenises to exactly the
    # tokens the training row has before that answer.
    prompt = e.render(CONVERSATION[:4], True)
    assert record["prompt"] == prompt and record["reference"] == "Six."
    assert ids[: record["prompt_len"]] == with_bos(chat_tok, enc(chat_tok, prompt))
    # ... and the whole row is the rendered conversation, plus the one EOS.
    assert ids == with_bos(chat_tok, enc(chat_tok, e.render(CONVERSATION, False))) + [eos]
    assert (
        chat_tok.decode(ids[record["prompt_len"] :])
        == expected_trained[len(expected_trained.split("Six.")[0]) :]
    )


def test_a_template_that_ends_turns_with_eos_gets_no_second_one(chat_tok):
    record, _ = encoder(chat_tok, chat_template="zephyr").encode({"messages": CONVERSATION}, 1)
    assert trained(chat_tok, record) == "Four.</s>\nSix.</s>\n"
    assert record["input_ids"].count(chat_tok.eos_token_id) == len(CONVERSATION)  # the template's own


def test_phi3_closing_eos_ends_the_conversation_not_each_turn(chat_tok):
    """Phi-3 renders eos_token after a conversation when not generating: an earlier turn is not
    'non-prefix-stable' for it, and the EOS is trained once, where the template puts it."""
    record, _ = encoder(chat_tok, chat_template="phi3").encode({"messages": CONVERSATION}, 1)
    assert trained(chat_tok, record) == "Four.<|end|>\nSix.<|end|>\n</s>"
    assert record["input_ids"].count(chat_tok.eos_token_id) == 1


# ----------------------------------------------------------------------------------------------------
# data.chat_template: built-in names, Jinja strings and files, the fallback's warning
# ----------------------------------------------------------------------------------------------------

SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
# apply_chat_template(SAMPLE, add_generation_prompt=True) of each model's published template (BOS <s>,
# EOS </s>); the templates without a system role get SAMPLE[1:].
RENDERED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n"
    "   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    "\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "<|system|>\nYou are a helpful assistant</s>\n<|user|>\nHello</s>\n<|assistant|>\nHi there</s>\n"
    "<|user|>\nWho are you</s>\n<|assistant|>\n   I am an assistant   </s>\n<|user|>\nAnother question</s>\n"
    "<|assistant|>\n",
    "mistral": "<s>[INST] Hello [/INST]Hi there</s> [INST] Who are you [/INST]   I am an assistant   </s> "
    "[INST] Another question [/INST]",
    "llama2": "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] "
    "Who are you [/INST] I am an assistant </s><s>[INST] Another question [/INST]",
    "gemma": "<s><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n"
    "<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n"
    "<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>"
    "\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question"
    "<|end|>\n<|assistant|>\n",
    "plain": "<|system|>\nYou are a helpful assistant\n<|user|>\nHello\n<|assistant|>\nHi there\n<|user|>\n"
    "Who are you\n<|assistant|>\n   I am an assistant   \n<|user|>\nAnother question\n<|assistant|>\n",
}
NO_SYSTEM_ROLE = {"mistral", "gemma"}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_as_the_models_published_ones(chat_tok, name):
    e = encoder(chat_tok, chat_template=name)
    sample = SAMPLE[1:] if name in NO_SYSTEM_ROLE else SAMPLE
    assert e.render(sample, True) == RENDERED[name]
    # Every built-in is prefix-stable on a multi-turn row, and the Encoder survives pickling (the prepare
    # stage runs it in worker processes) with the same result.
    row = {"messages": sample[:-1]}
    record, _ = e.encode(row, 1)
    assert pickle.loads(pickle.dumps(e)).encode(row, 1)[0] == record
    assert record["reference"] == "   I am an assistant   "


def test_chat_template_as_jinja_string_and_file_keys_the_cache_by_its_text(chat_tok, tmp_path):
    text = BUILTIN_TEMPLATES["chatml"]
    f = tmp_path / "my.jinja"
    f.write_text(text)
    by_file = DataConfig(format="chat", chat_template=str(f))
    assert template_key(by_file) == text == template_key(DataConfig(format="chat", chat_template=text))
    record = Encoder(by_file, chat_tok).encode({"messages": CONVERSATION}, 1)[0]
    assert record == encoder(chat_tok, chat_template="chatml").encode({"messages": CONVERSATION}, 1)[0]
    f.write_text(text.replace("<|im_end|>", "<|end|>"))  # an edited file is other data
    assert template_key(by_file) != text
    assert trained(chat_tok, Encoder(by_file, chat_tok).encode({"messages": CONVERSATION}, 1)[0]).startswith(
        "Four.<|end|>"
    )
    with pytest.raises(DataError, match=r"'chatlm' is not a built-in template \(chatml, llama3"):
        template_key(DataConfig(format="chat", chat_template="chatlm"))


def test_the_tokenizer_template_is_used_and_the_fallback_is_announced_once(tiny_tok, chat_tok, caplog):
    with caplog.at_level(logging.WARNING, logger="core.data"):
        e = encoder(tiny_tok)
        for line in range(1, 4):
            e.encode({"messages": CONVERSATION}, line)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no chat template" in warnings[0] and "'plain'" in warnings[0]
    assert "data.chat_template" in warnings[0]

    own = copy.deepcopy(chat_tok)
    own.chat_template = BUILTIN_TEMPLATES["chatml"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.data"):
        record = encoder(own).encode({"messages": CONVERSATION}, 1)[0]
    assert not caplog.records
    assert trained(own, record).startswith("Four.<|im_end|>")


# ----------------------------------------------------------------------------------------------------
# A template that raises
# ----------------------------------------------------------------------------------------------------


def test_a_template_that_raises_names_the_row_its_message_and_what_to_set(chat_tok):
    e = encoder(chat_tok, chat_template="gemma")
    assert e.encode({"messages": CONVERSATION[1:]}, 6)[0]["reference"] == "Six."
    with pytest.raises(DataError) as err:
        e.encode({"messages": CONVERSATION}, 7)  # gemma has no system role
    msg = str(err.value)
    assert "line 7" in msg and "System role not supported" in msg and "data.chat_template" in msg
    assert "fix the rows" in msg
    # The system message was data.system_prompt's: the message says it can be turned off.
    with pytest.raises(DataError, match=r"line 3: .*System role not supported.*data\.system_prompt: null"):
        encoder(chat_tok, chat_template="gemma", system_prompt="Be nice.").encode(
            {"messages": CONVERSATION[1:]}, 3
        )


# ----------------------------------------------------------------------------------------------------
# Truncation policies
# ----------------------------------------------------------------------------------------------------


def _first_turn_len(tok) -> int:
    """Tokens of the row cut after its first answer, with BOS and the final EOS."""
    return len(with_bos(tok, enc(tok, render(tok, CONVERSATION[:3], False)))) + 1


def test_truncate_turns_keeps_the_whole_turns_that_fit(chatml_tok):
    """Long multi-turn chats used to be cut inside a turn, without EOS, and reported only as truncated."""
    tok, n = chatml_tok, _first_turn_len(chatml_tok)
    full = len(encoder(tok).encode({"messages": CONVERSATION}, 1)[0]["input_ids"])
    assert n + 3 < full
    record, notes = encoder(tok, max_seq_len=n + 3).encode({"messages": CONVERSATION}, 1)  # turn 1 fits
    assert set(notes) == {"truncated", "turns_dropped"}  # whole turns: it still ends with EOS
    assert len(record["input_ids"]) == n and record["input_ids"][-1] == tok.eos_token_id
    assert trained(tok, record) == "Four.<|im_end|>\n</s>"
    # prompt, reference and prompt_len describe the kept row: its last assistant turn is the reference.
    assert record["reference"] == "Four." and record["prompt"] == render(tok, CONVERSATION[:2], True)
    assert record["input_ids"][: record["prompt_len"]] == with_bos(tok, enc(tok, record["prompt"]))
    # A row whose first trainable turn does not fit is too long.
    with pytest.raises(Reject, match="too_long"):
        encoder(tok, max_seq_len=n - 1).encode({"messages": CONVERSATION}, 1)


def test_truncate_cuts_the_last_turn_and_drop_rejects(chatml_tok):
    tok, n = chatml_tok, _first_turn_len(chatml_tok)
    record, notes = encoder(tok, max_seq_len=n + 3, truncation="truncate").encode(
        {"messages": CONVERSATION}, 1
    )
    assert set(notes) == {"truncated", "lost_eos"}
    assert len(record["input_ids"]) == len(record["labels"]) == n + 3
    assert record["input_ids"][-1] != tok.eos_token_id
    assert trained(tok, record) == "Four.<|im_end|>\n"  # the cut fell in turn 2's prompt
    assert record["reference"] == "Four." and record["prompt"] == render(tok, CONVERSATION[:2], True)
    with pytest.raises(Reject, match="too_long"):
        encoder(tok, max_seq_len=n + 3, truncation="drop").encode({"messages": CONVERSATION}, 1)
    # A row that fits is never a note, under any policy.
    for policy in ("truncate_turns", "truncate", "drop"):
        assert encoder(tok, truncation=policy).encode({"messages": CONVERSATION}, 1)[1] == ()


def test_single_turn_formats_truncate_under_truncate_turns(chat_tok):
    row = {"instruction": "Say hello", "output": "The quick brown fox jumps over the lazy dog. " * 4}
    prompt_len = 1 + len(enc(chat_tok, PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")))
    record, notes = encoder(chat_tok, format="alpaca", max_seq_len=prompt_len + 4).encode(row, 1)
    assert set(notes) == {"truncated", "lost_eos"}
    assert len(record["input_ids"]) == prompt_len + 4 and record["prompt_len"] == prompt_len
    with pytest.raises(Reject, match="too_long"):
        encoder(chat_tok, format="alpaca", max_seq_len=prompt_len + 4, truncation="drop").encode(row, 1)


# ----------------------------------------------------------------------------------------------------
# train_on_last_turn_only, system prompts
# ----------------------------------------------------------------------------------------------------


def test_train_on_last_turn_only(chat_tok):
    e = encoder(chat_tok, chat_template="chatml", train_on_last_turn_only=True)
    record, _ = e.encode({"messages": CONVERSATION}, 1)
    assert trained(chat_tok, record) == "Six.<|im_end|>\n</s>"
    # The same tokens as training every turn: only the labels differ.
    assert (
        record["input_ids"]
        == encoder(chat_tok, chat_template="chatml").encode({"messages": CONVERSATION}, 1)[0]["input_ids"]
    )


def test_system_prompt_is_injected_where_the_row_has_none(chat_tok):
    e = encoder(chat_tok, chat_template="chatml", system_prompt="Answer in French.")
    record, _ = e.encode({"messages": CONVERSATION[1:]}, 1)
    assert record["prompt"].startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user")
    own, _ = e.encode({"messages": CONVERSATION}, 2)  # the row's own system message is kept
    assert "Be brief." in own["prompt"] and "French" not in own["prompt"]


def test_alpaca_system_field_and_default(chat_tok):
    plain = {"instruction": "Say hello", "output": "Hi"}
    record, _ = encoder(chat_tok, format="alpaca").encode(plain, 1)
    assert record["prompt"] == PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")  # unchanged
    with_system = encoder(chat_tok, format="alpaca", system_prompt="Be kind.")
    expected = "### System:\nBe kind.\n\n" + PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")
    assert with_system.encode(plain, 1)[0]["prompt"] == expected
    own = with_system.encode({**plain, "system": "Be terse."}, 1)[0]["prompt"]
    assert own.startswith("### System:\nBe terse.\n\n### Instruction:")


# ----------------------------------------------------------------------------------------------------
# Field mapping: data.fields, ShareGPT and OpenAI rows
# ----------------------------------------------------------------------------------------------------


def test_fields_map_our_names_to_the_files(chat_tok):
    e = encoder(chat_tok, format="alpaca", fields={"instruction": "question", "output": "answer"})
    record, _ = e.encode({"question": "Say hello", "answer": "Hi"}, 1)
    assert record["prompt"] == PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction="Say hello")
    assert record["reference"] == "Hi"
    with pytest.raises(Reject, match="missing_field:answer"):
        e.encode({"question": "Say hello", "output": "Hi"}, 2)
    c = encoder(chat_tok, format="completion", fields={"prompt": "q", "completion": "a"})
    assert c.encode({"q": "Two plus two is", "a": " four."}, 1)[0]["reference"] == " four."
    t = encoder(chat_tok, format="text", fields={"text": "body"})
    assert t.encode({"body": "The quick brown fox."}, 1)[0]["prompt_len"] == 0


def test_sharegpt_and_openai_rows_are_read_without_configuration(chat_tok):
    e = encoder(chat_tok, chat_template="chatml")
    openai, _ = e.encode({"messages": CONVERSATION}, 1)
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    assert e.encode(sharegpt, 2)[0] == openai
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    assert e.encode({"messages": parts}, 3)[0] == openai  # OpenAI content parts
    mapped = encoder(
        chat_tok, chat_template="chatml", fields={"messages": "dialog", "role": "speaker", "content": "text"}
    )
    dialog = {"dialog": [{"speaker": m["role"], "text": m["content"]} for m in CONVERSATION]}
    assert mapped.encode(dialog, 3)[0] == openai
    with pytest.raises(Reject, match="missing_field:dialog"):
        mapped.encode({"messages": CONVERSATION}, 4)
