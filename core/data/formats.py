"""Rows -> segments: (context, answer) turns for each data.format, tokenised separately so the mask boundary
is exact; field names mapped from the file's (data.fields), chat rows as OpenAI messages or ShareGPT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.data.errors import DataError, Reject

PROMPT_TEMPLATE_ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# Axolotl's alpaca_w_system: a system text before the instruction, only where the row (or
# data.system_prompt) gives one, so rows without one render exactly as plain alpaca.
PROMPT_SYSTEM_ALPACA = "### System:\n{system}\n\n"

FORMAT_FIELDS = {
    "alpaca": "instruction, optional input, output (optional system)",
    "completion": "prompt, completion",
    "text": "text",
    "chat": "messages: [{role, content}, ...] (or ShareGPT conversations: [{from, value}, ...]) with at "
    "least one assistant turn",
}
# The field that tells each format's rows apart, to suggest data.format when every row is rejected.
TELLTALE = {"alpaca": "instruction", "completion": "completion", "text": "text", "chat": "messages"}
# ShareGPT speaker names (``from``) -> chat roles; other roles (OpenAI's tool, function, ...) pass as they are.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


@dataclass
class Turn:
    """One (prompt, answer) step of a row: ``context`` is the untrained text since the previous turn, the
    ``answer`` the text trained for it (a chat template's end-of-turn marker included); ``prompt`` and
    ``reference`` describe the row when it ends with this turn (the eval prompt and expected answer)."""

    context: str
    answer: str
    prompt: str
    reference: str


@dataclass
class Segments:
    turns: list[Turn]
    templated: bool = False  # rendered by a chat template (BOS/EOS may already be in the text)
    scored_only: bool = False  # plain text: no prompt, scored by loss only (prompt_len 0)


class Fields:
    """Our field names -> the file's (data.fields); reasons name the file's field."""

    def __init__(self, mapping: dict[str, str] | None = None):
        self.mapping = dict(mapping or {})

    def name(self, ours: str) -> str:
        return self.mapping.get(ours, ours)

    def get(self, row: dict, ours: str, *, optional: bool = False) -> str:
        name = self.name(ours)
        value = row.get(name)
        if value is None:  # a JSON null is a missing value: never passed on
            if optional:
                return ""
            raise Reject(f"missing_field:{name}")
        if not isinstance(value, str):
            raise Reject(f"wrong_type:{name}")
        return value

    def nonempty(self, row: dict, ours: str) -> str:
        value = self.get(row, ours)
        if not value.strip():
            raise Reject(f"empty_{self.name(ours)}")
        return value


def segments(
    row: Any,
    fmt: str,
    *,
    fields: dict[str, str] | None = None,
    render: Render | None = None,
    system_prompt: str | None = None,
    eos_text: str | None = None,
) -> Segments:
    """The turns of one row of format ``fmt``.

    Args:
        row: one parsed row of the file.
        fmt: data.format of its source.
        fields: ours -> the file's field names (data.fields).
        render: the chat template (format chat only).
        system_prompt: data.system_prompt, used where the row has no system text of its own.
        eos_text: the tokenizer's EOS token as text (format chat; see chat_segments).

    Raises:
        Reject: the row cannot be used (its reason names the file's field).
        jinja2.TemplateError: the chat template refused the row (the Encoder names the row's line).
    """
    if not isinstance(row, dict):
        raise Reject("not_an_object")
    f = Fields(fields)
    if fmt == "alpaca":
        instruction = f.nonempty(row, "instruction")
        inp = f.get(row, "input", optional=True)
        output = f.nonempty(row, "output")
        system = f.get(row, "system", optional=True) or system_prompt or ""
        if inp.strip():
            prompt = PROMPT_TEMPLATE_ALPACA.format(instruction=instruction, input=inp)
        else:
            prompt = PROMPT_TEMPLATE_ALPACA_NO_INPUT.format(instruction=instruction)
        if system.strip():
            prompt = PROMPT_SYSTEM_ALPACA.format(system=system) + prompt
        return Segments([Turn(prompt, output, prompt, output)])
    if fmt == "completion":
        prompt = f.get(row, "prompt")
        completion = f.nonempty(row, "completion")
        return Segments([Turn(prompt, completion, prompt, completion)])
    if fmt == "text":
        text = f.nonempty(row, "text")
        return Segments([Turn("", text, "", text)], scored_only=True)
    if fmt == "chat":
        if render is None:
            raise ValueError("format chat needs the chat template's render function")
        return chat_segments(chat_messages(row, f, system_prompt), render, eos_text)
    raise DataError(f"unknown data.format {fmt!r}; expected one of {', '.join(FORMAT_FIELDS)}")


def chat_messages(row: dict, f: Fields, system_prompt: str | None = None) -> list[dict]:
    """A row's conversation as ``[{role, content}]`` up to its last assistant turn (later messages would
    teach nothing): OpenAI ``messages`` or ShareGPT ``conversations`` ({from, value}, human/gpt roles),
    either found without configuration, or under the names data.fields gives."""
    key = f.name("messages")
    if "messages" not in f.mapping and key not in row and "conversations" in row:
        key = "conversations"  # ShareGPT
    messages = row.get(key)
    if messages is None:
        raise Reject(f"missing_field:{key}")
    if not isinstance(messages, list):
        raise Reject(f"wrong_type:{key}")
    if not messages:
        raise Reject(f"empty_{key}")
    role_key, content_key = f.name("role"), f.name("content")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise Reject("bad_message")
        rk, ck = role_key, content_key
        if "role" not in f.mapping and rk not in m and "from" in m:
            rk = "from"  # ShareGPT
        if "content" not in f.mapping and ck not in m and "value" in m:
            ck = "value"
        role, content = m.get(rk), m.get(ck)
        if isinstance(content, list) and all(_text_part(p) for p in content):
            content = "".join(p["text"] for p in content)  # OpenAI content parts: [{type: text, text}]
        if not (isinstance(role, str) and isinstance(content, str)):
            raise Reject("bad_message")
        out.append({"role": ROLE_ALIASES.get(role.strip().lower(), role), "content": content})
    assistant = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    if not assistant:
        raise Reject("no_assistant_turn")
    if not out[assistant[-1]]["content"].strip():
        raise Reject("empty_assistant")
    out = out[: assistant[-1] + 1]
    if system_prompt is not None and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def chat_segments(messages: list[dict], render: Render, eos_text: str | None = None) -> Segments:
    """One turn per assistant message: its context is what the template renders before its generation
    prompt ends, its answer what the template renders after that, up to the next message (the template's
    own end-of-turn marker included, never an added EOS). The turns concatenate to the whole rendered
    conversation, so the tokens before an answer are the tokens of that turn's eval prompt.

    ``eos_text``: the tokenizer's EOS as text. A template may close a conversation with it only when not
    generating (Phi-3 renders ``eos_token`` at the end): an earlier turn then ends where that EOS starts.
    """
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    full = render(messages, False)
    turns: list[Turn] = []
    done = 0  # characters of ``full`` already in turns
    for n, i in enumerate(assistant):
        # Before the first message there is nothing to render (a template may index messages[0]).
        before = render(messages[:i], True) if i else ""
        if not (full.startswith(before) and len(before) >= done):
            raise Reject("chat_template_not_prefix_stable")
        if n == len(assistant) - 1:
            end = len(full)
        else:
            upto = render(messages[: i + 1], False)
            if eos_text and not full.startswith(upto) and upto.endswith(eos_text) and full.endswith(eos_text):
                upto = upto[: -len(eos_text)]
            end = len(upto)
            if not (upto.startswith(before) and end > len(before) and full.startswith(upto)):
                raise Reject("chat_template_not_prefix_stable")
        turns.append(Turn(full[done : len(before)], full[len(before) : end], before, messages[i]["content"]))
        done = end
    return Segments(turns, templated=True)
