"""OpenAI-compatible HTTP server over the rollout engine: /v1/chat/completions, /v1/completions, /v1/models.

    python -m alignment.serve --checkpoint=embedded                      # tiny random model, embedded tokenizer
    python -m alignment.serve --checkpoint=/models/qwen2-hf --chat_template=chatml --port=8000
    python -m alignment.serve --checkpoint=/tmp/sft/checkpoints --model=tiny --tokenizer=embedded

Requests run through the engine one at a time (a lock); each request's n samples share one prefill. Supported
request fields: messages / prompt, max_tokens (or max_completion_tokens), temperature (default 1), top_p, n,
stop, seed, and the common extensions top_k and min_p. A prompt that leaves no room for max_tokens is refused
with 400 (code context_length_exceeded), never truncated. Errors are JSON: {"error": {"message", "type",
"param", "code"}}.
"""
from __future__ import annotations

import http.server
import json
import os
import secrets
import threading
import time
import uuid
from typing import Any

import ml_collections
from absl import app, flags, logging

from alignment.config import model_preset
from alignment.data.chat import encode_chat
from alignment.generation.build import build_engine
from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish
from alignment.train.runtime import is_hf_checkpoint

MAX_BODY_BYTES = 16 << 20
MAX_SAMPLES = 64
MAX_STOPS = 4


class RequestError(ValueError):
    """A client error: answered with `status` and the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _field(body: dict, name: str, kind: type | tuple, default: Any, check=None, rule: str = "") -> Any:
    """body[name] (or default when absent/null), type- and range-checked."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or (check and not check(value)):
        raise RequestError(f"'{name}' must be {rule}, got {json.dumps(value)}", param=name)
    return value


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: v >= 0, "a number >= 0")),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        min_p=float(_field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")),
    )


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)


class Service:
    """Turns request bodies into engine calls and OpenAI response bodies; thread-safe."""

    def __init__(self, engine: Engine, tokenizer, chat_template: str, model_name: str, default_max_tokens: int = 256,
                 pas=None):
        """pas: an `alignment.pas.augment.Pas` put in front of the model for chat requests, or None."""
        self.engine, self.tokenizer, self.chat_template = engine, tokenizer, chat_template
        self.model_name, self.default_max_tokens, self.pas = model_name, default_max_tokens, pas
        self._lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "alignment"}]}

    def chat_completions(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
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
        with self._lock:
            out = self.engine.generate([ids], max_tokens, sampling, num_samples=n,
                                       seeds=[secrets.randbits(31) if seed is None else seed],
                                       stop_ids=self._single_token_stops(stop))
        choices = [finish(self.tokenizer, out.row(r), bool(out.stopped[r]), stop) for r in range(n)]
        completion_tokens = sum(c["num_tokens"] for c in choices)
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(ids) + completion_tokens}
        return choices, usage

    def _single_token_stops(self, stop: tuple[str, ...]) -> list[int]:
        """Stop strings that are one vocabulary token also end the row inside the decode loop."""
        return [i for i in map(self.tokenizer.token_id, stop) if i is not None]


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to `self.server.service`; every answer is JSON."""

    protocol_version = "HTTP/1.1"
    routes = {"/v1/chat/completions": "chat_completions", "/v1/completions": "completions"}

    def do_GET(self):
        path = self.path.rstrip("/")
        if path == "/v1/models":
            return self._send(200, self.server.service.models())
        if path == "/health":
            return self._send(200, {"status": "ok"})
        if path in self.routes:
            return self._error(RequestError(f"use POST for {path}", status=405))
        return self._error(RequestError(f"unknown path {self.path}", status=404))

    def do_POST(self):
        path = self.path.rstrip("/")
        try:
            if path not in self.routes:
                raise RequestError(f"unknown path {self.path}; POST /v1/chat/completions or /v1/completions",
                                   status=404)
            body = self._read_json()
            self._send(200, getattr(self.server.service, self.routes[path])(body))
        except RequestError as e:
            self._error(e)
        except ValueError as e:  # invalid settings found deeper (e.g. sampling parameters)
            self._error(RequestError(str(e)))
        except Exception as e:  # a bug, not the client's fault: say so and keep serving
            logging.exception("request to %s failed", path)
            self._error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500))

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a Content-Length header is required", status=411) from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}", status=413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _error(self, e: RequestError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self.close_connection = True  # the body may be unread; do not parse it as the next request
        self._send(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        logging.info("%s %s", self.address_string(), format % args)


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (see `server.server_address`)."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.service = service
    return server


def engine_config(checkpoint: str, model: str = "tiny", tokenizer: str = "", chat_template: str = "chatml",
                  seed: int = 0) -> ml_collections.ConfigDict:
    """The stage-style config `build_engine` takes. checkpoint: 'embedded' (random init), HF dir or Orbax path."""
    if checkpoint != "embedded" and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    hf = checkpoint != "embedded" and is_hf_checkpoint(checkpoint)
    return ml_collections.ConfigDict(dict(
        stage="serve", seed=seed, model=model_preset(model), init_from="" if checkpoint == "embedded" else checkpoint,
        tokenizer=tokenizer or (checkpoint if hf else "embedded"), chat_template=chat_template,
        mesh=dict(data=-1, fsdp=1, tensor=1, sequence=1), sharding_rules={}))


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "'embedded', a HF directory or an Orbax checkpoint.")
_MODEL = flags.DEFINE_string("model", "tiny", "configs/models preset for Orbax checkpoints and 'embedded'.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer; default: the HF directory, else 'embedded'.")
_TEMPLATE = flags.DEFINE_string("chat_template", "chatml", "llama2 | llama3 | chatml")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "New tokens when a request does not say.")
_SEED = flags.DEFINE_integer("seed", 0, "Random-init seed for --checkpoint=embedded.")
_PAS = flags.DEFINE_string("pas", "", "PAS model in front of chat requests: a pas run's pas_model directory or "
                                      "an API root; '' = off.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required ('embedded', a HF directory or an Orbax checkpoint)")
    config = engine_config(_CHECKPOINT.value, _MODEL.value, _TOKENIZER.value, _TEMPLATE.value, _SEED.value)
    engine, tokenizer = build_engine(config)
    name = os.path.basename(os.path.normpath(_CHECKPOINT.value))
    pas = None
    if _PAS.value:
        from alignment.pas.augment import load_pas

        pas = load_pas(_PAS.value)
    server = make_server(Service(engine, tokenizer, _TEMPLATE.value, name, _MAX_TOKENS.value, pas), _HOST.value,
                         _PORT.value)
    logging.info("serving %s on http://%s:%d/v1", name, *server.server_address[:2])
    try:
        server.serve_forever()
    finally:
        server.server_close()


def run() -> None:
    try:
        app.run(main)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run()
