"""Chat templates (Llama-2, Llama-3, ChatML as used by Qwen2) rendered to token ids, per-token roles and a loss mask.

Conversations are rendered as a list of segments (template scaffolding and message contents kept apart) and
each segment is tokenized on its own, so role and loss-mask boundaries fall exactly between segments instead
of being recovered from character offsets.

Tool use (`alignment.data.tools`): given `tools` or assistant turns with `tool_calls`, chatml renders as Qwen2.5's
template and llama3 as Llama-3.1's do with `tools=` (tool definitions in the system / first user turn, calls in
the model's format, results as `<tool_response>` blocks in a user turn / JSON in an ipython turn). The model's
calls are trained like any assistant content; tool results never are.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import numpy as np

from alignment.data import tools as tool_format
from alignment.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TEMPLATES = ("llama2", "llama3", "chatml")
TRAIN_ON = ("all_assistant", "last_assistant")

# Special tokens each template writes as single ids; llama2 uses the tokenizer's own BOS/EOS instead.
_TEMPLATE_SPECIALS = {
    "llama2": (),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
_LLAMA3_HEADERS = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}
LLAMA31_DATE = "26 Jul 2024"  # the "Today Date" Llama-3.1's template writes when not given one


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """A tokenized conversation; all arrays have shape [seq].

    ids: int32 token ids. roles: int8 index into ROLES of the turn each token belongs to (scaffolding such as
    headers and BOS takes the role of its turn). loss_mask: bool, True exactly on trained assistant content
    tokens and their end-of-turn token.
    """

    ids: np.ndarray
    roles: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Segment:
    """A piece of the rendering. kind: "text" (tokenized), "special" (one vocab token), "bos"/"eos" (tokenizer ids)."""

    text: str
    role: str
    turn: int  # index of the message it belongs to; the generation prompt uses len(messages)
    kind: str = "text"
    loss: bool = False
    fresh: bool = False  # tokenize as a standalone string: it starts a new sequence right after BOS


def _special(token: str, role: str, turn: int, loss: bool = False) -> _Segment:
    return _Segment(token, role, turn, kind="special", loss=loss)


def _validate_messages(messages: Sequence[Any], add_generation_prompt: bool) -> None:
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        calls = tool_format.message_tool_calls(m, f"message {i}")
        if "role" not in m or ("content" not in m and not calls):
            raise ValueError(f"message {i}: missing {'role' if 'role' not in m else 'content'!r} "
                             f"(keys present: {sorted(m)})")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if calls and role != "assistant":
            raise ValueError(f"message {i} ({role}): only assistant messages may have tool_calls")
        if not isinstance(content, str) and not (calls and content is None):
            raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if role == "assistant" and not calls and not content.strip():
            raise ValueError(f"message {i}: assistant content is empty or whitespace-only")
    if not add_generation_prompt and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn (pass add_generation_prompt=True to build a prompt)")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        close = difflib.get_close_matches(str(template), TEMPLATES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown chat template {template!r}{hint} (valid templates: {', '.join(TEMPLATES)})")


def _llama2_segments(messages: Sequence[dict], add_generation_prompt: bool) -> list[_Segment]:
    """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]`.

    Llama-2 has no tool role: tool messages are rendered as user-side content inside [INST] ... [/INST], and
    consecutive user/tool messages share one [INST] block, joined by a blank line. A system message is only
    allowed first. The prompt already ends with [/INST], so add_generation_prompt adds nothing.
    """
    del add_generation_prompt
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    start = 0 if system is None else 1
    segments: list[_Segment] = []
    block_open = False  # inside an [INST] block whose [/INST] is not yet written
    for i in range(start, len(messages)):
        role, content = messages[i]["role"], messages[i]["content"].strip()
        if role == "system":
            raise ValueError(f"llama2 template: a system message is only allowed first (message {i})")
        if role == "assistant":
            if not block_open:
                raise ValueError(_llama2_order_error(i, start))
            segments.append(_Segment(" [/INST]", messages[i - 1]["role"], i - 1))
            # The trailing space is part of what the model emits before EOS, so it is trained on too.
            segments.append(_Segment(f" {content} ", role, i, loss=True))
            segments.append(_Segment("</s>", role, i, kind="eos", loss=True))
            block_open = False
        elif block_open:
            segments += [_Segment("\n\n", role, i), _Segment(content, role, i)]
        else:
            segments += [_Segment("<s>", role, i, kind="bos"), _Segment("[INST]", role, i, fresh=True)]
            if system is not None and i == start:
                segments += [
                    _Segment(" <<SYS>>\n", "system", 0),
                    _Segment(system, "system", 0),
                    _Segment("\n<</SYS>>\n\n", "system", 0),
                    _Segment(content, role, i),
                ]
            else:
                segments.append(_Segment(f" {content}", role, i))
            block_open = True
    if block_open:
        segments.append(_Segment(" [/INST]", messages[-1]["role"], len(messages) - 1))
    return segments


def _llama2_order_error(i: int, start: int) -> str:
    if i == start:
        return f"llama2 template: the conversation must start with a user or tool turn, but message {i} is assistant"
    return f"llama2 template: message {i} (assistant) follows another assistant turn; put a user or tool turn between"


def _llama3_segments(messages: Sequence[dict], add_generation_prompt: bool) -> list[_Segment]:
    """`<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...`; tool -> ipython."""

    def header(role: str, turn: int) -> list[_Segment]:
        return [
            _special("<|start_header_id|>", role, turn),
            _Segment(_LLAMA3_HEADERS[role], role, turn),
            _special("<|end_header_id|>", role, turn),
            _Segment("\n\n", role, turn),
        ]

    segments = [_special("<|begin_of_text|>", messages[0]["role"], 0)]
    for i, m in enumerate(messages):
        role, is_assistant = m["role"], m["role"] == "assistant"
        segments += header(role, i)
        segments.append(_Segment(m["content"].strip(), role, i, loss=is_assistant))
        segments.append(_special("<|eot_id|>", role, i, loss=is_assistant))
    if add_generation_prompt:
        segments += header("assistant", len(messages))
    return segments


def _chatml_segments(messages: Sequence[dict], add_generation_prompt: bool) -> list[_Segment]:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, as Qwen2 renders it, without a default system."""
    segments: list[_Segment] = []
    for i, m in enumerate(messages):
        role, is_assistant = m["role"], m["role"] == "assistant"
        segments += [
            _special("<|im_start|>", role, i),
            _Segment(f"{role}\n", role, i),
            _Segment(m["content"], role, i, loss=is_assistant),
            _special("<|im_end|>", role, i, loss=is_assistant),
            _Segment("\n", role, i),
        ]
    if add_generation_prompt:
        turn = len(messages)
        segments += [_special("<|im_start|>", "assistant", turn), _Segment("assistant\n", "assistant", turn)]
    return segments


_QWEN_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _chatml_tool_segments(messages: Sequence[dict], add_generation_prompt: bool,
                          tools: list | None) -> list[_Segment]:
    """Qwen2.5's tool layout (Qwen3's without a system message: no default system text is written).

    The tool definitions follow the system message; an assistant turn writes its content, then one
    `<tool_call>` block per call; consecutive tool messages share one user turn of `<tool_response>` blocks.
    """
    segments: list[_Segment] = []
    start = 0
    if tools is not None:
        has_system = messages[0]["role"] == "system"
        segments += [_special("<|im_start|>", "system", 0), _Segment("system\n", "system", 0)]
        if has_system:
            segments.append(_Segment(messages[0]["content"] + "\n\n", "system", 0))
        definitions = "".join("\n" + tool_format.tojson(t) for t in tools)
        segments += [_Segment(_QWEN_TOOLS_INTRO + definitions + _QWEN_TOOLS_OUTRO, "system", 0),
                     _special("<|im_end|>", "system", 0), _Segment("\n", "system", 0)]
        start = 1 if has_system else 0
    for i in range(start, len(messages)):
        m = messages[i]
        role = m["role"]
        calls = tool_format.message_tool_calls(m, f"message {i}")
        if role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                segments += [_special("<|im_start|>", role, i), _Segment("user", role, i)]
            segments += [_Segment(f"\n{tool_format.RESPONSE_OPEN}\n", role, i), _Segment(m["content"], role, i),
                         _Segment(f"\n{tool_format.RESPONSE_CLOSE}", role, i)]
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                segments += [_special("<|im_end|>", role, i), _Segment("\n", role, i)]
            continue
        trained = role == "assistant"
        segments += [_special("<|im_start|>", role, i), _Segment(f"{role}\n", role, i)]
        content = m.get("content") or ""
        segments.append(_Segment(content, role, i, loss=trained))
        for j, call in enumerate(calls):
            # The newline after the role header is the generation prompt's; later blocks start on a new line.
            sep = "\n" if content or j else ""
            segments.append(_Segment(sep + tool_format.format_call("chatml", call), role, i, loss=True))
        segments += [_special("<|im_end|>", role, i, loss=trained), _Segment("\n", role, i)]
    if add_generation_prompt:
        turn = len(messages)
        segments += [_special("<|im_start|>", "assistant", turn), _Segment("assistant\n", "assistant", turn)]
    return segments


_LLAMA31_TOOLS_INTRO = ("Given the following functions, please respond with a JSON for a function call with its proper "
                        "arguments that best answers the given prompt.\n\n"
                        'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
                        'its value}.Do not use variables.\n\n')


def _llama31_segments(messages: Sequence[dict], add_generation_prompt: bool, tools: list | None) -> list[_Segment]:
    """Llama-3.1's layout: a system turn with the knowledge and today dates (and "Environment: ipython" when tools
    are given), the tool definitions in the first user turn, one JSON call per assistant turn, tool results as
    JSON in ipython turns. Contents are stripped, as the template trims them."""

    def header(role: str, turn: int) -> list[_Segment]:
        return [_special("<|start_header_id|>", role, turn), _Segment(_LLAMA3_HEADERS[role], role, turn),
                _special("<|end_header_id|>", role, turn), _Segment("\n\n", role, turn)]

    has_system = messages[0]["role"] == "system"
    environment = "Environment: ipython\n" if tools is not None else ""
    segments = [_special("<|begin_of_text|>", "system", 0), *header("system", 0),
                _Segment(f"{environment}Cutting Knowledge Date: December 2023\nToday Date: {LLAMA31_DATE}\n\n",
                         "system", 0)]
    if has_system:
        segments.append(_Segment(messages[0]["content"].strip(), "system", 0))
    segments.append(_special("<|eot_id|>", "system", 0))
    start = 1 if has_system else 0
    if tools is not None:
        if start >= len(messages) or messages[start]["role"] != "user":
            raise ValueError(f"llama3 template with tools: message {start} must be a user turn (the tool definitions "
                             "go into the first user message)")
        definitions = "".join(tool_format.tojson(t, indent=4) + "\n\n" for t in tools)
        segments += [*header("user", start), _Segment(_LLAMA31_TOOLS_INTRO + definitions, "user", start),
                     _Segment(messages[start]["content"].strip(), "user", start), _special("<|eot_id|>", "user", start)]
        start += 1
    for i in range(start, len(messages)):
        m = messages[i]
        role = m["role"]
        calls = tool_format.message_tool_calls(m, f"message {i}")
        trained = role == "assistant"
        segments += header(role, i)
        if calls:
            if len(calls) != 1:
                raise ValueError(f"llama3 template: message {i} has {len(calls)} tool calls; Llama-3.1 makes one "
                                 "call per assistant turn (split them into turns, or use chatml)")
            segments.append(_Segment(tool_format.format_call("llama3", calls[0]), role, i, loss=True))
        elif role == "tool":  # the template JSON-encodes tool results, strings included
            segments.append(_Segment(tool_format.tojson(m["content"]), role, i))
        else:
            segments.append(_Segment(m["content"].strip(), role, i, loss=trained))
        segments.append(_special("<|eot_id|>", role, i, loss=trained))
    if add_generation_prompt:
        segments += header("assistant", len(messages))
    return segments


_RENDERERS = {"llama2": _llama2_segments, "llama3": _llama3_segments, "chatml": _chatml_segments}
_TOOL_RENDERERS = {"llama3": _llama31_segments, "chatml": _chatml_tool_segments}


def _segments(messages: Sequence[dict], template: str, add_generation_prompt: bool,
              tools: list | None = None) -> list[_Segment]:
    _check_template(template)
    tools = tool_format.check_tools(tools)
    _validate_messages(messages, add_generation_prompt)
    if tool_format.uses_tools(messages, tools):
        if template not in _TOOL_RENDERERS:
            raise ValueError(f"chat template {template!r} has no tool format; use {' or '.join(_TOOL_RENDERERS)}")
        segments = _TOOL_RENDERERS[template](messages, add_generation_prompt, tools)
    else:
        segments = _RENDERERS[template](messages, add_generation_prompt)
    return [s for s in segments if s.text]


def render_chat_text(messages: Sequence[dict], template: str, add_generation_prompt: bool = False,
                     tools: list | None = None) -> str:
    """The conversation rendered as plain text, exactly as `encode_chat` tokenizes it (BOS/EOS as <s>/</s>)."""
    return "".join(s.text for s in _segments(messages, template, add_generation_prompt, tools))


def _check_tokenizer(tokenizer: Tokenizer, template: str) -> None:
    missing = [t for t in _TEMPLATE_SPECIALS[template] if tokenizer.token_id(t) is None]
    if template == "llama2" and tokenizer.bos_id is None:
        missing.append("BOS (<s>)")
    if missing:
        raise ValueError(f"template {template!r} needs special tokens the tokenizer lacks: {', '.join(missing)}")


def _segment_ids(tokenizer: Tokenizer, seg: _Segment) -> list[int]:
    if seg.kind == "bos":
        return [tokenizer.bos_id]
    if seg.kind == "eos":
        return [tokenizer.eos_id]
    if seg.kind == "special":
        return [tokenizer.token_id(seg.text)]
    return tokenizer.encode(seg.text) if seg.fresh else tokenizer.encode_continuation(seg.text)


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    template: str,
    *,
    train_on: str = "all_assistant",
    add_generation_prompt: bool = False,
    tools: list | None = None,
) -> EncodedChat:
    """Tokenize a conversation with `template`; see EncodedChat for the [seq] arrays returned.

    train_on: "all_assistant" puts every assistant turn in the loss, "last_assistant" only the final one.
    add_generation_prompt: append the header that cues the assistant's next reply (never in the loss).
    tools: tool definitions (`alignment.data.tools`), rendered as the template's model renders them.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown train_on {train_on!r}; valid values: {', '.join(TRAIN_ON)}")
    segments = _segments(messages, template, add_generation_prompt, tools)
    _check_tokenizer(tokenizer, template)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = set(assistant_turns[-1:] if train_on == "last_assistant" else assistant_turns)
    ids: list[int] = []
    roles: list[int] = []
    mask: list[bool] = []
    for seg in segments:
        seg_ids = _segment_ids(tokenizer, seg)
        ids += seg_ids
        roles += [ROLES.index(seg.role)] * len(seg_ids)
        mask += [seg.loss and seg.turn in trained] * len(seg_ids)
    return EncodedChat(
        ids=np.asarray(ids, np.int32), roles=np.asarray(roles, np.int8), loss_mask=np.asarray(mask, bool)
    )


def encode_tool_results(tokenizer: Tokenizer, template: str, results: Sequence[str]) -> list[int]:
    """Token ids that follow a tool-calling turn's end-of-turn token: the tool `results` (one per call, in
    order) in the template's layout, then the header of the model's next turn; exactly the tokens `encode_chat`
    writes there, so a multi-turn rollout's sequence is the rendering of its conversation."""
    placeholder = {"type": "function", "function": {"name": "tool", "arguments": {}}}
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [placeholder]}]
    messages += [{"role": "tool", "content": r} for r in results]
    _check_tokenizer(tokenizer, template)
    segments = _segments(messages, template, add_generation_prompt=True)
    end = max(k for k, s in enumerate(segments) if s.turn == 1 and s.loss)  # the calling turn's end-of-turn token
    return [i for seg in segments[end + 1:] for i in _segment_ids(tokenizer, seg)]
