"""OpenAI-compatible HTTP server over the rollout engine: /v1/chat/completions, /v1/completions, /v1/models.

    python -m alignment.serve --config.checkpoint=embedded           # tiny random model, embedded tokenizer
    python -m alignment.serve --config.checkpoint=/models/qwen2-hf --config.port=8000
    python -m alignment.serve --config=configs/serve.py --config.checkpoint=/tmp/sft/checkpoints --verbosity=1

Settings are configs/serve.py's keys (that file is the default --config). The server logs its address and one
line per request; --verbosity=1 adds the libraries' (JAX, Orbax) log lines.

Requests run through the engine one at a time (a lock); each request's n samples share one prefill, and n is
padded to a power of two so a new n re-uses a compiled program (prompt and token lengths are bucketed by the
engine). Supported request fields: model, messages / prompt, max_tokens (or max_completion_tokens),
temperature (default 1), top_p, n, stop, seed, and the common extensions top_k and min_p; message content is a
string or a list of text parts. A `model` other than the served names gets 404 model_not_found; an absent one
means the served model. A prompt that leaves no room for max_tokens is refused with 400 (code
context_length_exceeded), never truncated. Errors are JSON: {"error": {"message", "type", "param", "code"}}.

Hostile or departed clients are contained (`alignment.generation.http_server`): at most `max_connections`
connections are served at once (more get 503 at once), every socket read waits at most `read_timeout` seconds
and a request body must arrive within it (else 408), and a client that disconnects cancels its generation
within `CANCEL_CHECK_STEPS` decode steps, so the next request does not wait for abandoned work.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from typing import Any, Sequence

import ml_collections

from alignment import config as config_lib
from alignment.config import Field, at_least, model_preset, one_of, positive
from alignment.data.chat import TEMPLATES, encode_chat
from alignment.generation.loading import build_engine
from alignment.generation.engine import Engine, bucket
from alignment.generation.http_server import RequestError, client_gone, make_server
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish

MAX_SAMPLES = 64
MAX_STOPS = 4
CANCEL_CHECK_STEPS = 16  # decode steps between checks of the client's connection

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


class Service:
    """Turns request bodies into engine calls and OpenAI response bodies; thread-safe.

    While a request runs in a handler thread, `client_gone` holds its connection check: the generation stops
    (engine `Cancelled`) when the client has gone away.
    """

    def __init__(self, engine: Engine, tokenizer, chat_template: str, model_name: str | Sequence[str],
                 default_max_tokens: int = 256, pas=None):
        """model_name: the name, or names, a request's `model` may give; the first is the one answers report.
        pas: an `alignment.pas.augment.Pas` put in front of the model for chat requests, or None."""
        self.engine, self.tokenizer, self.chat_template = engine, tokenizer, chat_template
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        if not self.model_names:
            raise ValueError("a served model needs at least one name")
        self.model_name, self.default_max_tokens, self.pas = self.model_names[0], default_max_tokens, pas
        self._lock = threading.Lock()

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

    def chat_completions(self, body: dict) -> dict:
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
        messages = _text_messages(messages)
        if self.pas is not None:
            messages = self._with_pas(messages, body.get("pas_keywords") or [])
        try:
            ids = encode_chat(self.tokenizer, messages, self.chat_template, add_generation_prompt=True).ids.tolist()
        except ValueError as e:
            raise RequestError(f"messages: {e}", param="messages") from None
        choices, usage = self._generate(body, ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["finish_reason"], "logprobs": None} for i, c in enumerate(choices)]}

    def _with_pas(self, messages: list, keywords) -> list:
        """The last user turn with the PAS complement appended; `pas_keywords` (search keywords of a
        retrieval-augmented prompt) are passed to PAS as constraints."""
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise RequestError("'pas_keywords' must be a list of strings", param="pas_keywords")
        try:
            return self.pas.augment_messages(messages, keywords)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RequestError(f"messages: PAS cannot complement them ({e})", param="messages") from None

    def completions(self, body: dict) -> dict:
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        choices, usage = self._generate(body, bos + self.tokenizer.encode(prompt))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "usage": usage,
                "choices": [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                            for i, c in enumerate(choices)]}

    def _generate(self, body: dict, ids: list[int]) -> tuple[list[dict], dict]:
        if body.get("stream"):
            raise RequestError("streaming is not supported; send stream=false", param="stream")
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
        with self._lock:  # a client that left while waiting here is cancelled before the prefill
            out = self.engine.generate([ids], max_tokens, sampling, num_samples=n, pad_samples_to=bucket(n, 1),
                                       seeds=[secrets.randbits(31) if seed is None else seed],
                                       stop_ids=self._single_token_stops(stop), cancelled=client_gone.get(),
                                       check_every=CANCEL_CHECK_STEPS)
        choices = [finish(self.tokenizer, out.row(r), bool(out.stopped[r]), stop) for r in range(n)]
        completion_tokens = sum(c["num_tokens"] for c in choices)
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(ids) + completion_tokens}
        return choices, usage

    def _single_token_stops(self, stop: tuple[str, ...]) -> list[int]:
        """Stop strings that are one vocabulary token also end the row inside the decode loop."""
        return [i for i in map(self.tokenizer.token_id, stop) if i is not None]


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
    "read_timeout": Field(low=0, open_low=True),
}


def check(config: ml_collections.ConfigDict) -> None:
    config_lib.check_fields(config, FIELDS)
    if not config.checkpoint:
        raise ValueError("config.checkpoint is required: 'embedded', a HF directory or an Orbax checkpoint")


def main(config: ml_collections.ConfigDict) -> None:
    check(config)
    loading = engine_config(config.checkpoint, config.model, config.tokenizer, config.chat_template, config.seed)
    engine, tokenizer = build_engine(loading)  # fills in the checkpoint's tokenizer and template
    names = served_model_names(config.checkpoint, config.served_model_name.split(","))
    pas = None
    if config.pas:
        from alignment.pas.augment import load_pas

        pas = load_pas(config.pas)
    server = make_server(Service(engine, tokenizer, loading.chat_template, names, config.max_tokens, pas), config.host,
                         config.port, config.max_connections, config.read_timeout, access_log=logger)
    logger.info("serving %s on http://%s:%d/v1", " = ".join(names), *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a user stops the server
        logger.info("stopped")
    finally:
        server.server_close()


def run() -> None:
    config_lib.run_command_line(main, "serve", show=("alignment.serve",))


if __name__ == "__main__":
    run()
