"""Chat templates (Llama-2, Llama-3, ChatML as used by Qwen2) rendered to token ids, per-token roles and a loss mask.

Conversations are rendered as a list of segments (template scaffolding and message contents kept apart) and
each segment is tokenized on its own, so role and loss-mask boundaries fall exactly between segments instead
of being recovered from character offsets.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import numpy as np

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
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"message {i}: missing {key!r} (keys present: {sorted(m)})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
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


_RENDERERS = {"llama2": _llama2_segments, "llama3": _llama3_segments, "chatml": _chatml_segments}


def _segments(messages: Sequence[dict], template: str, add_generation_prompt: bool) -> list[_Segment]:
    _check_template(template)
    _validate_messages(messages, add_generation_prompt)
    return [s for s in _RENDERERS[template](messages, add_generation_prompt) if s.text]


def render_chat_text(messages: Sequence[dict], template: str, add_generation_prompt: bool = False) -> str:
    """The conversation rendered as plain text, exactly as `encode_chat` tokenizes it (BOS/EOS as <s>/</s>)."""
    return "".join(s.text for s in _segments(messages, template, add_generation_prompt))


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
) -> EncodedChat:
    """Tokenize a conversation with `template`; see EncodedChat for the [seq] arrays returned.

    train_on: "all_assistant" puts every assistant turn in the loss, "last_assistant" only the final one.
    add_generation_prompt: append the header that cues the assistant's next reply (never in the loss).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown train_on {train_on!r}; valid values: {', '.join(TRAIN_ON)}")
    segments = _segments(messages, template, add_generation_prompt)
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
