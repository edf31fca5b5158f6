"""Tool use in chat data: tool definitions, the model's tool calls and how each chat template writes and reads them.

Conversations use the OpenAI / Hugging Face form:

    tools = [{"type": "function", "function": {"name": "add", "description": "...", "parameters": {JSON schema}}}]
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call_0",
                                                         "function": {"name": "add", "arguments": {"a": 1}}}]}
    {"role": "tool", "tool_call_id": "call_0", "content": "3"}

`arguments` may be a dict or a JSON object string (the OpenAI wire form); templates write the dict.

How the templates write a call (the models' own chat templates, reproduced by `alignment.data.chat`):
  chatml (Qwen2.5): `<tool_call>\\n{"name": "add", "arguments": {"a": 1}}\\n</tool_call>`, one block per call,
      several calls in one turn allowed; tool results go back in a user turn as `<tool_response>` blocks;
  llama3 (Llama-3.1): the whole assistant turn is `{"name": "add", "parameters": {"a": 1}}`, one call per turn;
      results come back in an `ipython` turn, JSON-encoded.
`parse_tool_calls` reads calls back out of generated text, reporting malformed ones instead of guessing.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_CHATML_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
MAX_CALLS = 16  # calls read from one turn at most: a model repeating itself cannot flood an environment


def tojson(value: Any, indent: int | None = None) -> str:
    """JSON exactly as the Hugging Face chat templates' `tojson` filter writes it (non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict
    id: str = ""

    def message_entry(self) -> dict:
        """The call as an entry of an assistant message's `tool_calls` (arguments as a dict)."""
        return {"type": "function", "id": self.id, "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: Any, where: str = "tools") -> list[dict] | None:
    """`tools` checked: None or a list of {"type": "function", "function": {"name": str, ...}}; [] counts as None."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"{where}: expected a list of tool definitions, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}, got {str(tool)[:80]}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}[{i}]: type must be 'function', got {tool.get('type')!r}")
    return tools or None


def _arguments(value: Any, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments are not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: arguments must be a JSON object, got {type(value).__name__}")
    return value


def message_tool_calls(message: dict, where: str) -> list[ToolCall]:
    """The calls of an assistant message's `tool_calls` (empty when it has none), checked."""
    entries = message.get("tool_calls") or []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: tool_calls must be a list, got {type(entries).__name__}")
    calls = []
    for j, entry in enumerate(entries):
        function = entry.get("function", entry) if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}: tool_calls[{j}] needs function.name, got {str(entry)[:80]}")
        arguments = _arguments(function.get("arguments", {}), f"{where}: tool_calls[{j}] ({function['name']})")
        calls.append(ToolCall(function["name"], arguments, str(entry.get("id", ""))))
    return calls


def uses_tools(messages: Sequence[dict], tools: list | None) -> bool:
    """Whether a conversation is rendered in its template's tool layout: tools are given or a turn calls one."""
    return tools is not None or any(m.get("tool_calls") for m in messages)


def format_call(template: str, call: ToolCall) -> str:
    """The text a template's assistant turn holds for one call (llama3: the whole turn)."""
    if template == "chatml":
        return f'{CALL_OPEN}\n{{"name": "{call.name}", "arguments": {tojson(call.arguments)}}}\n{CALL_CLOSE}'
    if template == "llama3":
        return f'{{"name": "{call.name}", "parameters": {tojson(call.arguments)}}}'
    raise ValueError(f"chat template {template!r} has no tool-call format (use chatml or llama3)")


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn read from generated text: its prose, the well-formed calls and one message per
    malformed call (bad JSON, no name, arguments not an object, an unclosed block)."""

    content: str
    calls: list[ToolCall]
    errors: list[str]


def _call_from_json(text: str, arguments_key: str) -> ToolCall:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError("a call must be a JSON object with a non-empty string 'name'")
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        raise ValueError(f"'{arguments_key}' must be a JSON object")
    return ToolCall(value["name"], arguments)


def parse_tool_calls(template: str, text: str) -> ParsedTurn:
    """The calls a model wrote in `text` (its turn, without the end-of-turn token), in `template`'s format."""
    calls, errors = [], []
    if template == "chatml":
        start = text.find(CALL_OPEN)
        content = text if start < 0 else text[:start].rstrip()  # the template writes content, "\n", the calls
        for match in list(_CHATML_CALL.finditer(text))[:MAX_CALLS]:
            if not match.group(0).endswith(CALL_CLOSE):
                errors.append(f"{CALL_OPEN} block is not closed")
                continue
            try:
                calls.append(_call_from_json(match.group(1).strip(), "arguments"))
            except ValueError as e:
                errors.append(str(e))
        return ParsedTurn(content, calls, errors)
    if template == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return ParsedTurn(text, [], [])
        try:
            return ParsedTurn("", [_call_from_json(body, "parameters")], [])
        except ValueError as e:
            return ParsedTurn("", [], [str(e)])
    raise ValueError(f"chat template {template!r} has no tool-call format (use chatml or llama3)")

