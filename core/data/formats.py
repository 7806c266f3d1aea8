"""Rows -> segments: (text, trained) pieces for each data.format, tokenised separately so the mask boundary is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.data.errors import DataError, Reject

PROMPT_TEMPLATE_ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# Used for format "chat" when the tokenizer has no chat template: "<|role|>\ncontent\n" per message and
# "<|assistant|>\n" as the generation prompt. Assistant content (plus EOS when add_eos) is trained;
# messages after the last assistant turn are dropped (they would teach nothing).
FALLBACK_CHAT_TURN = "<|{role}|>\n{content}\n"
FALLBACK_CHAT_GENERATION_PROMPT = "<|assistant|>\n"

FORMAT_FIELDS = {
    "alpaca": "instruction, optional input, output",
    "completion": "prompt, completion",
    "text": "text",
    "chat": "messages: [{role, content}, ...] with at least one assistant turn",
}
# The field that tells each format's rows apart, to suggest data.format when every row is rejected.
TELLTALE = {"alpaca": "instruction", "completion": "completion", "text": "text", "chat": "messages"}


def _field(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:  # a JSON null is a missing value: never passed on
        if optional:
            return ""
        raise Reject(f"missing_field:{name}")
    if not isinstance(value, str):
        raise Reject(f"wrong_type:{name}")
    return value


def _nonempty(row: dict, name: str) -> str:
    value = _field(row, name)
    if not value.strip():
        raise Reject(f"empty_{name}")
    return value


@dataclass
class Segments:
    pieces: list[tuple[str, bool]]  # (text, trained)
    prompt: str  # formatted prompt, for generation metrics
    reference: str  # expected response, no EOS
    templated: bool = False  # rendered by a chat template (BOS/EOS may already be in the text)


def segments(row: Any, fmt: str, tokenizer: Any) -> Segments:
    if not isinstance(row, dict):
        raise Reject("not_an_object")
    if fmt == "alpaca":
        instruction = _nonempty(row, "instruction")
        inp = _field(row, "input", optional=True)
        output = _nonempty(row, "output")
        if inp.strip():
            prompt = PROMPT_TEMPLATE_ALPACA.format(instruction=instruction, input=inp)
        else:
            prompt = PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction=instruction)
        return Segments([(prompt, False), (output, True)], prompt, output)
    if fmt == "completion":
        prompt = _field(row, "prompt")
        completion = _nonempty(row, "completion")
        return Segments([(prompt, False), (completion, True)], prompt, completion)
    if fmt == "text":
        text = _nonempty(row, "text")
        return Segments([(text, True)], "", text)
    if fmt == "chat":
        return chat_segments(row, tokenizer)
    raise DataError(f"unknown data.format {fmt!r}; expected one of {', '.join(FORMAT_FIELDS)}")


def chat_segments(row: dict, tokenizer: Any) -> Segments:
    messages = row.get("messages")
    if messages is None:
        raise Reject("missing_field:messages")
    if not isinstance(messages, list):
        raise Reject("wrong_type:messages")
    if not messages:
        raise Reject("empty_messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise Reject("bad_message")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise Reject("no_assistant_turn")
    last = assistant[-1]
    if not messages[last]["content"].strip():
        raise Reject("empty_assistant")
    reference = messages[last]["content"]

    if getattr(tokenizer, "chat_template", None):

        def render(msgs: list[dict], gen: bool) -> str:
            if not msgs:
                return ""
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        # Each assistant turn is the difference between the conversation rendered up to it with a
        # generation prompt and rendered including it; that needs the template to be prefix-stable.
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i in assistant:
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise Reject("chat_template_not_prefix_stable")
            pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
        prompt = render(messages[:last], True)
        return Segments([p for p in pieces if p[0]], prompt, reference, templated=True)

    pieces = []
    for m in messages[: last + 1]:
        if m["role"] == "assistant":
            pieces += [("<|assistant|>\n", False), (m["content"], True), ("\n", False)]
        else:
            pieces.append((FALLBACK_CHAT_TURN.format(**m), False))
    prompt = (
        "".join(FALLBACK_CHAT_TURN.format(**m) for m in messages[:last]) + FALLBACK_CHAT_GENERATION_PROMPT
    )
    pieces.pop()  # the newline after the last assistant turn teaches nothing
    return Segments(pieces, prompt, reference)
