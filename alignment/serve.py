"""OpenAI-compatible HTTP server over the rollout engine: /v1/chat/completions, /v1/completions, /v1/models.

    python -m alignment.serve --config.checkpoint=embedded           # tiny random model, embedded tokenizer
    python -m alignment.serve --config.checkpoint=/models/qwen2-hf --config.port=8000
    python -m alignment.serve --config=configs/serve.py --config.checkpoint=/tmp/sft/checkpoints --verbosity=1

Settings are configs/serve.py's keys (that file is the default --config). The server logs its address and one
line per request; --verbosity=1 adds the libraries' (JAX, Orbax) log lines.

Concurrent requests share the engine's batch: every request's sequences (its `n` samples, which share the
prompt's KV pages) are queued with one engine worker (`alignment.generation.worker`) that steps the continuous-
batching engine on its own thread, so a request joins the decoding batch at the next step whatever else is
running. `stream: true` answers with server-sent events in the OpenAI format (chunks of new text, then
`data: [DONE]`; `stream_options.include_usage` adds a usage chunk). At most `max_waiting` sequences may wait for
a decode slot; a request that would queue more gets 429 (code queue_full) with Retry-After. Supported request
fields: model, messages / prompt, max_tokens (or max_completion_tokens), temperature (default 1), top_p, n,
stop (up to 4 strings, found in the text as it is generated), seed, stream, stream_options, tools, tool_choice,
parallel_tool_calls, and the common extensions top_k and min_p; message content is a string or a list of text
parts, and assistant messages may carry tool_calls (tool results come back as role "tool" messages).

Tools (chatml and llama3 templates, see `alignment.data.tools`): the definitions are rendered into the prompt as
the model's template does; calls the model writes come back as `message.tool_calls` (arguments as a JSON string)
with finish_reason "tool_calls", and what it wrote before them as `content`. tool_choice "auto" (the default with
tools) lets the model choose, "none" leaves the tools out of the prompt and answers in text, and "required" or
{"type": "function", "function": {"name": ...}} starts the answer with the template's call opening (the named
function's name written in), so the model completes a call. A call that does not parse is returned as text.
Streamed, text is sent as it comes until a call may begin; the calls follow in one chunk each. A `model` other than the
served names gets 404 model_not_found; an absent one means the served model. A prompt that leaves no room for
max_tokens is refused with 400 (code context_length_exceeded), never truncated. Errors are JSON:
{"error": {"message", "type", "param", "code"}}.

Hostile or departed clients are contained (`alignment.generation.http_server`): at most `max_connections`
connections are served at once (more get 503 at once), every socket read waits at most `read_timeout` seconds
and a request body must arrive within it (else 408), and a client that disconnects has its sequences cancelled
within `CANCEL_POLL_S` seconds (or at the first chunk a streaming answer cannot write), their slots and KV
pages freed at the next engine step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import ml_collections

from alignment import config as config_lib
from alignment.config import Field, at_least, model_preset, one_of, positive
from alignment.data import tools as tool_format
from alignment.data.chat import TEMPLATES, encode_chat
from alignment.generation.engine import Cancelled, Engine
from alignment.generation.http_server import RequestError, client_gone, make_server
from alignment.generation.loading import build_engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.scheduler import Request
from alignment.generation.text import finish
from alignment.generation.worker import Job, QueueFull, Worker

MAX_SAMPLES = 64
MAX_STOPS = 4
CANCEL_POLL_S = 0.1  # how often a waiting request checks that its client is still connected

logger = logging.getLogger("alignment.serve")  # by name: run as __main__, the module's own name says nothing


def _field(body: dict, name: str, kind: type | tuple, default: Any, check=None, rule: str = "") -> Any:
    """body[name] (or default when absent/null), type- and range-checked."""
    value = body.get(name)
    if value is None:
        return default
    bad = isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, float) and
                                                                      not math.isfinite(value))
    if bad or (check and not check(value)):
        raise RequestError(f"'{name}' must be {rule}, got {json.dumps(value)}", param=name)
    return value


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: v >= 0, "a finite number >= 0")),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        min_p=float(_field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")),
    )


def _text_messages(messages: list) -> list:
    """messages with each list-of-parts content ([{"type": "text", "text": ...}, ...], as many OpenAI clients
    send) joined into one string, parts separated by newlines; parts other than text are refused."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    got = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"messages[{i}].content[{j}]: only text parts "
                                       f"{{\"type\": \"text\", \"text\": ...}} are supported, got {got!r}",
                                       param=f"messages[{i}].content")
            message = {**message, "content": "\n".join(part["text"] for part in content)}
        out.append(message)
    return out


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)


# How a forced call begins in each template: tool_choice "required" writes the opening, a named function also
# its name and what follows it.
_CALL_OPENING = {"chatml": tool_format.CALL_OPEN + '\n{"name": "', "llama3": '{"name": "'}
_AFTER_NAME = {"chatml": '", "arguments": ', "llama3": '", "parameters": '}


@dataclasses.dataclass(frozen=True)
class _Tools:
    """How a chat request uses tools: the definitions rendered into the prompt, the forced opening of the answer
    (a call's start), whether calls are read from the answer, and whether more than one is returned."""

    definitions: list | None = None
    opening: str = ""
    parse: bool = False
    parallel: bool = True


def _tools(body: dict, template: str) -> _Tools:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked."""
    try:
        definitions = tool_format.check_tools(body.get("tools"))
    except ValueError as e:
        raise RequestError(str(e), param="tools") from None
    choice, parallel = body.get("tool_choice"), body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError(f"'parallel_tool_calls' must be true or false, got {json.dumps(parallel)}",
                           param="parallel_tool_calls")
    if definitions is None or choice == "none":
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs a non-empty 'tools' list", param="tool_choice")
        return _Tools()
    if template not in _CALL_OPENING:
        raise RequestError(f"this model's chat template {template!r} has no tool-call format", param="tools")
    if choice in (None, "auto"):
        return _Tools(definitions, "", True, parallel)
    if choice == "required":
        return _Tools(definitions, _CALL_OPENING[template], True, parallel)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", param="tool_choice")
    names = [t["function"]["name"] for t in definitions]
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                           param="tool_choice")
    return _Tools(definitions, _CALL_OPENING[template] + name + _AFTER_NAME[template], True, parallel)


def _call_entry(call: tool_format.ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


class Service:
    """Turns request bodies into engine requests and OpenAI response bodies; thread-safe.

    Requests from all handler threads go to one `Worker`, which steps the engine on its own thread, so concurrent
    requests decode in the same batch. While a request waits, `client_gone` (its connection check) is asked every
    `CANCEL_POLL_S`; a departed client's sequences are cancelled (engine `Cancelled` for the handler).
    A streamed answer is an iterator of chunk bodies that cancels its sequences when closed early.
    """

    def __init__(self, engine: Engine, tokenizer, chat_template: str, model_name: str | Sequence[str],
                 default_max_tokens: int = 256, pas=None, max_waiting: int = 256):
        """model_name: the name, or names, a request's `model` may give; the first is the one answers report.
        pas: an `alignment.pas.augment.Pas` put in front of the model for chat requests, or None.
        max_waiting: sequences that may wait for a decode slot; beyond, requests get 429."""
        self.engine, self.tokenizer, self.chat_template = engine, tokenizer, chat_template
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        if not self.model_names:
            raise ValueError("a served model needs at least one name")
        self.model_name, self.default_max_tokens, self.pas = self.model_names[0], default_max_tokens, pas
        self.worker = Worker(engine, max_waiting)

    def close(self) -> None:
        self.worker.close()

    def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": name, "object": "model", "owned_by": "alignment"} for name in self.model_names]}

    def _check_model(self, body: dict) -> None:
        """404 model_not_found for a `model` this server does not serve, as the OpenAI API answers."""
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise RequestError(f"'model' must be a string, got {json.dumps(model)}", param="model")
        if model not in self.model_names:
            raise RequestError(f"model {model!r} is not served here; served: {', '.join(self.model_names)}",
                               param="model", code="model_not_found", status=404)

    def chat_completions(self, body: dict) -> dict | Iterator[dict]:
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
        messages = _text_messages(messages)
        if self.pas is not None:
            messages = self._with_pas(messages, body.get("pas_keywords") or [])
        tools = _tools(body, self.chat_template)
        try:
            ids = encode_chat(self.tokenizer, messages, self.chat_template, add_generation_prompt=True,
                              tools=tools.definitions).ids.tolist()
        except ValueError as e:
            raise RequestError(f"messages: {e}", param="messages") from None
        if tools.opening:
            ids += self.tokenizer.encode_continuation(tools.opening)
        run = self._start(body, ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if run.stream:
            return self._events(run, {**head, "object": "chat.completion.chunk"},
                                lambda i, text: {"index": i, "delta": {"content": text}, "logprobs": None},
                                first=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None}, tools=tools)
        choices, usage = self._collect(run)
        answers = [self._message(c, tools) for c in choices]
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": i, "message": message, "finish_reason": reason, "logprobs": None}
                            for i, (message, reason) in enumerate(answers)]}

    def _message(self, choice: dict, tools: _Tools) -> tuple[dict, str]:
        """(the assistant message, finish_reason) of a finished choice: its tool calls when it made any."""
        text = choice["text"]
        if tools.parse:
            parsed = tool_format.parse_tool_calls(self.chat_template, tools.opening + text)
            if parsed.calls and not parsed.errors:
                calls = parsed.calls if tools.parallel else parsed.calls[:1]
                return {"role": "assistant", "content": parsed.content or None,
                        "tool_calls": [_call_entry(c) for c in calls]}, "tool_calls"
            text = tools.opening + text  # a forced call that does not parse comes back as the text written
        return {"role": "assistant", "content": text}, choice["finish_reason"]

    def _content_so_far(self, tools: _Tools) -> Callable[[str], str]:
        """text -> the part of a streamed answer that is surely content, not (the start of) a tool call."""
        if not tools.parse:
            return lambda text: text
        if tools.opening:
            return lambda text: ""
        if self.chat_template == "llama3":  # a call is the whole turn, a JSON object
            return lambda text: "" if not text.strip() or text.lstrip().startswith("{") else text.rstrip()

        def before_call(text: str) -> str:
            at = text.find(tool_format.CALL_OPEN)
            if at < 0:  # hold back an ending that may grow into the opening tag
                at = next((len(text) - k for k in range(len(tool_format.CALL_OPEN) - 1, 0, -1)
                           if text.endswith(tool_format.CALL_OPEN[:k])), len(text))
            return text[:at].rstrip()

        return before_call

    def _with_pas(self, messages: list, keywords) -> list:
        """The last user turn with the PAS complement appended; `pas_keywords` (search keywords of a
        retrieval-augmented prompt) are passed to PAS as constraints."""
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise RequestError("'pas_keywords' must be a list of strings", param="pas_keywords")
        try:
            return self.pas.augment_messages(messages, keywords)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RequestError(f"messages: PAS cannot complement them ({e})", param="messages") from None

    def completions(self, body: dict) -> dict | Iterator[dict]:
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        run = self._start(body, bos + self.tokenizer.encode(prompt))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if run.stream:
            return self._events(run, head, lambda i, text: {"index": i, "text": text, "logprobs": None})
        choices, usage = self._collect(run)
        return {**head, "usage": usage,
                "choices": [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                            for i, c in enumerate(choices)]}

    def _start(self, body: dict, ids: list[int]) -> "_Run":
        """Checks a request's settings and queues its sequences."""
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError(f"'stream' must be true or false, got {json.dumps(stream)}", param="stream")
        options = body.get("stream_options")
        if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage",
                                                                                               False), bool)):
            raise RequestError("'stream_options' must be {\"include_usage\": true or false}", param="stream_options")
        room = self.engine.max_len - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model's context length is "
                               f"{self.engine.max_len}", param="messages", code="context_length_exceeded")
        max_tokens = _field(body, "max_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 1, "an integer >= 1")
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif max_tokens > room:
            raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together more "
                               f"than this model's context length {self.engine.max_len}", param="max_tokens",
                               code="context_length_exceeded")
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_SAMPLES, f"an integer in [1, {MAX_SAMPLES}]")
        seed = _field(body, "seed", int, None, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")
        sampling, stop = _sampling(body), _stops(body)
        try:
            job = self.worker.submit(ids, max_tokens, sampling, seed=secrets.randbits(31) if seed is None else seed,
                                     samples=n, stop_strings=stop)
        except QueueFull as e:
            raise RequestError(str(e), code="queue_full", status=429) from None
        except ValueError as e:  # more than the KV cache can ever hold
            raise RequestError(str(e), param="max_tokens", code="context_length_exceeded") from None
        return _Run(job, stop, len(ids), stream, bool((options or {}).get("include_usage")))

    def _wait(self, run: "_Run") -> Iterator[Request]:
        """The run's sequences as they grow or end; cancels them when the client has gone away or the
        iteration is left early (a streaming client that stopped reading)."""
        gone = client_gone.get()
        try:
            for changed in self.worker.updates(run.job, CANCEL_POLL_S):
                if gone is not None and gone():
                    raise Cancelled(sum(len(r.generated) for r in run.job.requests))
                if changed is not None:
                    if changed.error:
                        raise RuntimeError(f"generation failed: {changed.error}")
                    yield changed
        finally:
            if not run.job.done:
                self.worker.cancel(run.job)

    def _collect(self, run: "_Run") -> tuple[list[dict], dict]:
        for _ in self._wait(run):
            pass
        choices = [finish(self.tokenizer, r.generated, r.stopped, run.stop) for r in run.job.requests]
        return choices, _usage(run.prompt_tokens, choices)

    def _events(self, run: "_Run", head: dict, choice, first=None, tools: _Tools = _Tools()) -> Iterator[dict]:
        """Chunk bodies of a streamed answer: `first(i)` for each choice (if given), then each choice's new text
        as it is generated (`choice(i, text)`), its last piece with the finish reason, and the usage when asked.
        With tools, text is held back from where a call may begin; a choice's calls come in its last chunk."""
        if first is not None:
            yield {**head, "choices": [first(i) for i in range(len(run.job.requests))]}
        index = {r: i for i, r in enumerate(run.job.requests)}
        texts = [_TextStream(self.tokenizer, run.stop, self._content_so_far(tools)) for _ in run.job.requests]
        finished = [None] * len(texts)
        for request in self._wait(run):
            i = index[request]
            if finished[i] is not None:
                continue
            if request.finished:
                finished[i] = finish(self.tokenizer, request.generated, request.stopped, run.stop)
                message, reason = self._message(finished[i], tools)
                piece = texts[i].rest(message["content"] or "")
                if "tool_calls" in message:
                    if piece:
                        yield {**head, "choices": [{**choice(i, piece), "finish_reason": None}]}
                    calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                    yield {**head, "choices": [{"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                                "finish_reason": reason}]}
                    continue
                yield {**head, "choices": [{**choice(i, piece), "finish_reason": reason}]}
            elif piece := texts[i].more(request.generated):
                yield {**head, "choices": [{**choice(i, piece), "finish_reason": None}]}
        if run.include_usage:
            yield {**head, "choices": [], "usage": _usage(run.prompt_tokens, finished)}


@dataclasses.dataclass
class _Run:
    job: Job
    stop: tuple[str, ...]
    prompt_tokens: int
    stream: bool
    include_usage: bool


def _usage(prompt_tokens: int, choices: list[dict]) -> dict:
    completion_tokens = sum(c["num_tokens"] for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _TextStream:
    """The text of one choice in pieces: each piece extends what was sent, and what was sent is always the
    start of the final text (`text.finish`'s). While generating, text that may be the start of a stop string,
    and an incomplete multi-byte character at the end, are held back."""

    def __init__(self, tokenizer, stop: tuple[str, ...], visible: Callable[[str], str] = lambda text: text):
        """visible: text -> the part of it that may be sent now (with tools: the part before any call)."""
        self.tokenizer, self.hold = tokenizer, max((len(s) for s in stop), default=1) - 1
        self.visible, self.sent = visible, ""

    def more(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special=True)
        end = len(text) - self.hold
        while end > 0 and text[end - 1] == "\ufffd":  # bytes of a character still to come
            end -= 1
        return self._extend(self.visible(text[:max(end, 0)]))

    def rest(self, final: str) -> str:
        return self._extend(final)

    def _extend(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new, or a decoding that changed earlier text: wait for it to settle
        piece, self.sent = text[len(self.sent):], text
        return piece


def engine_config(checkpoint: str, model: str = "tiny", tokenizer: str = "", chat_template: str = "",
                  seed: int = 0) -> ml_collections.ConfigDict:
    """The stage-style config `build_engine` takes. checkpoint: 'embedded' (random init), a run, checkpoint or HF
    directory; tokenizer and chat_template '' are the checkpoint's (build_engine fills them in)."""
    if checkpoint != "embedded" and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"config.checkpoint={checkpoint!r} does not exist")
    return ml_collections.ConfigDict(dict(
        stage="serve", seed=seed, model=model_preset(model), init_from="" if checkpoint == "embedded" else checkpoint,
        tokenizer=tokenizer, chat_template=chat_template, mesh=dict(data=-1, fsdp=1, tensor=1, sequence=1),
        sharding_rules={}))


def served_model_names(checkpoint: str, names: Sequence[str] = ()) -> list[str]:
    """The `model` names requests may give: `names` (blanks dropped) when given, else the checkpoint's directory
    name and 'default', the name this project's configs send (eval `model_name`, the PAS teacher's and judge's
    `model`)."""
    return [n.strip() for n in names if n.strip()] or [os.path.basename(os.path.normpath(checkpoint)), "default"]


# The values of configs/serve.py's keys, checked before anything is loaded.
FIELDS = {
    "chat_template": one_of("", *TEMPLATES),
    "seed": at_least(0),
    "port": Field(low=0, high=65535, integer=True),
    "max_tokens": positive(),
    "max_connections": positive(),
    "slots": positive(),
    "max_waiting": positive(),
    "read_timeout": Field(low=0, open_low=True),
}


def check(config: ml_collections.ConfigDict) -> None:
    config_lib.check_fields(config, FIELDS)
    if not config.checkpoint:
        raise ValueError("config.checkpoint is required: 'embedded', a HF directory or an Orbax checkpoint")


def main(config: ml_collections.ConfigDict) -> None:
    check(config)
    loading = engine_config(config.checkpoint, config.model, config.tokenizer, config.chat_template, config.seed)
    engine, tokenizer = build_engine(loading, slots=config.slots)  # fills in the checkpoint's tokenizer, template
    names = served_model_names(config.checkpoint, config.served_model_name.split(","))
    pas = None
    if config.pas:
        from alignment.pas.augment import load_pas

        pas = load_pas(config.pas)
    service = Service(engine, tokenizer, loading.chat_template, names, config.max_tokens, pas, config.max_waiting)
    server = make_server(service, config.host, config.port, config.max_connections, config.read_timeout,
                         access_log=logger)
    logger.info("serving %s on http://%s:%d/v1", " = ".join(names), *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a user stops the server
        logger.info("stopped")
    finally:
        server.server_close()
        service.close()


def run() -> None:
    config_lib.run_command_line(main, "serve", show=("alignment.serve",))


if __name__ == "__main__":
    run()
