"""The OpenAI-compatible server answers real HTTP clients on localhost; bad requests get 4xx JSON errors; hostile
or departed clients (stalled bodies, too many connections, disconnects, broken pipes) are contained. The command
line prints the address and one line per request (library logs with --verbosity), and bad settings are one line."""
import concurrent.futures
import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import flax.linen as nn
import jax
import pytest

from alignment import sharding
from alignment.config import model_preset
from alignment.data.chat import encode_chat, render_chat_text
from alignment.data.tokenizer import load_tokenizer
from alignment.generation import client
from alignment.generation.engine import Engine
from alignment.generation.http_server import make_server, serving
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import stop_token_ids
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.serve import Service, engine_config, served_model_names

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
MAX_LEN = 64  # a short context makes the over-long case cheap


@pytest.fixture(scope="module")
def model():
    """(config, params, tokenizer, one-device mesh) of the tiny model."""
    config = ModelConfig.from_dict(model_preset("tiny").to_dict())
    module = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(module.init(key, *dummy_inputs())["params"]))(jax.random.key(0))
    return config, params, load_tokenizer("embedded"), sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def make_engine(model, **options):
    config, params, tokenizer, mesh = model
    return Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=tokenizer.pad_id,
                  detokenize=lambda ids: tokenizer.decode(ids, skip_special=True), slots=16, **options)


@pytest.fixture(scope="module")
def served(model):
    tokenizer = model[2]
    # Rows in buckets from 8 (as on TPU / GPU): requests of 1 to 8 sequences share one compiled program.
    engine = make_engine(model, stop_ids=stop_token_ids(tokenizer, "chatml"), max_len=MAX_LEN, min_rows=8)
    with serving(Service(engine, tokenizer, "chatml", "tiny")) as base:
        yield base, engine, tokenizer


def post(url: str, data: bytes, headers=None):
    """(status, parsed JSON body) of a POST, error statuses included."""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_completion_matches_the_engine(served):
    base, engine, tokenizer = served
    status, body = post(f"{base}/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": 2}).encode())
    assert status == 200, body
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    ids = encode_chat(tokenizer, MESSAGES, "chatml", add_generation_prompt=True).ids.tolist()
    direct = engine.generate([ids], 8, num_samples=2)  # n=2 everywhere in this file: one compiled program
    text = tokenizer.decode(direct.row(0)[:-1] if direct.stopped[0] else direct.row(0), skip_special=True)
    assert [c["message"]["content"] for c in body["choices"]] == [text, text]  # greedy: both samples agree
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 2 * int(direct.lengths[0])
    # The client helper used by the evaluation and PAS stages, with base URLs written either way.
    assert client.chat(base, MESSAGES, max_tokens=8, temperature=0, n=2) == text
    assert client.chat(base + "/v1/", MESSAGES, max_tokens=8, temperature=0, n=2) == text


def test_completions_and_models_and_seeded_sampling(served):
    base, _, _ = served
    # The chat rendered as plain text: about as long as the chat prompt, so the same compiled bucket serves it.
    request = {"prompt": render_chat_text(MESSAGES, "chatml", add_generation_prompt=True), "max_tokens": 6,
               "temperature": 1.0, "top_p": 0.9, "seed": 4, "n": 2}
    first = post(f"{base}/v1/completions", json.dumps(request).encode())
    second = post(f"{base}/v1/completions", json.dumps(request).encode())
    assert first[0] == 200 and first[1]["object"] == "text_completion"
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]  # same seed, same text
    assert first[1]["choices"][0]["finish_reason"] in ("stop", "length")
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("payload, status, needle", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'["a list"]', 400, "must be a JSON object"),
    (json.dumps({"max_tokens": 4}).encode(), 400, "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "unknown role"),
    (json.dumps({"messages": MESSAGES, "temperature": -1}).encode(), 400, "'temperature' must be"),
    (json.dumps({"messages": MESSAGES, "temperature": float("inf")}).encode(), 400, "'temperature' must be"),
    (json.dumps({"messages": MESSAGES, "temperature": float("nan")}).encode(), 400, "'temperature' must be"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', 400, "'temperature' must be"),
    (json.dumps({"messages": MESSAGES, "top_p": float("nan")}).encode(), 400, "'top_p' must be"),
    (json.dumps({"messages": MESSAGES, "model": 7}).encode(), 400, "'model' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
     .encode(), 400, "only text parts"),
    (json.dumps({"messages": MESSAGES, "top_p": 0}).encode(), 400, "'top_p' must be"),
    (json.dumps({"messages": MESSAGES, "n": 0}).encode(), 400, "'n' must be"),
    (json.dumps({"messages": MESSAGES, "stream": "yes"}).encode(), 400, "'stream' must be true or false"),
    (json.dumps({"messages": MESSAGES, "stream": True, "stream_options": [1]}).encode(), 400, "'stream_options'"),
    (json.dumps({"messages": MESSAGES, "max_tokens": MAX_LEN}).encode(), 400, "context length"),
    (json.dumps({"messages": [{"role": "user", "content": "1 + " * MAX_LEN}]}).encode(), 400, "context length"),
])
def test_bad_requests_get_json_errors(served, payload, status, needle):
    base, _, _ = served
    code, body = post(f"{base}/v1/chat/completions", payload)
    assert code == status and needle in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_methods(served):
    base, _, _ = served
    assert post(f"{base}/v1/embeddings", b"{}")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/v1/chat/completions", timeout=30)
    assert e.value.code == 405


def test_client_raises_the_server_message(served):
    base, _, _ = served
    with pytest.raises(RuntimeError, match="HTTP 400: .*context length"):
        client.chat(base, MESSAGES, max_tokens=MAX_LEN)


def test_engine_config_for_checkpoints(tmp_path):
    assert engine_config("embedded").tokenizer == ""  # the checkpoint's, resolved by build_engine
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # an HF directory: config.json beside safetensors weights
    hf = engine_config(str(tmp_path))
    assert hf.init_from == str(tmp_path) and hf.tokenizer == ""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine_config(str(tmp_path / "missing"))


def raw_exchange(base: str, data: bytes, wait: float = 10.0) -> bytes:
    """What the server sends back on a raw connection that sends `data` and stays open, until it closes."""
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_unknown_model_is_404_model_not_found(served):
    base, _, _ = served
    for path, field in (("chat/completions", {"messages": MESSAGES}), ("completions", {"prompt": "Hello"})):
        code, body = post(f"{base}/v1/{path}", json.dumps({"model": "gpt-4o", "max_tokens": 2, **field}).encode())
        assert code == 404, body
        assert body["error"] == {"message": body["error"]["message"], "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}
        assert "gpt-4o" in body["error"]["message"] and "tiny" in body["error"]["message"]


def test_served_model_names():
    assert served_model_names("/models/qwen2-7b/") == ["qwen2-7b", "default"]  # 'default': what configs send
    assert served_model_names("embedded", ["a", "b"]) == ["a", "b"]


def test_content_as_a_list_of_text_parts(served):
    base, _, _ = served
    as_string = {"messages": [{"role": "user", "content": "What is 2 + 3?\nThink."}], "max_tokens": 4,
                 "temperature": 0, "n": 2}
    as_parts = {**as_string, "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"},
                                                                          {"type": "text", "text": "Think."}]}]}
    strings, parts = (post(f"{base}/v1/chat/completions", json.dumps(b).encode()) for b in (as_string, as_parts))
    assert strings[0] == parts[0] == 200, parts
    assert strings[1]["usage"] == parts[1]["usage"]
    assert strings[1]["choices"] == parts[1]["choices"]


def test_a_new_n_or_length_reuses_the_compiled_programs(served):
    base, _, _ = served
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if event.endswith("backend_compile_duration") \
        else None
    request = lambda n, content, max_tokens: post(f"{base}/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "n": n}).encode())
    assert request(3, "What is 2 + 3?", 5)[0] == 200  # compiles the programs (rows, prompt and pages are buckets)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # Prompts of 19, 20 and 29 tokens (one 32-token bucket), 3 to 7 new tokens (one 16-token bucket).
        for n, content, max_tokens in ((4, "What is 2 + 3?", 5), (3, "What is 12 + 1?", 7),
                                       (4, "Name two prime numbers, please.", 3)):
            code, body = request(n, content, max_tokens)
            assert code == 200 and len(body["choices"]) == n, body
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_stalled_and_malformed_bodies_do_not_hold_a_worker(served):
    base, _, _ = served
    engine, tokenizer = served[1], served[2]
    with serving(Service(engine, tokenizer, "chatml", "tiny"), read_timeout=0.5) as quick:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
        start = time.monotonic()
        answer = raw_exchange(quick, head.format(100).encode() + b'{"messages"')  # 11 of 100 bytes, then silence
        assert answer.startswith(b"HTTP/1.1 408") and b"11 of the 100 body bytes" in answer, answer
        assert raw_exchange(quick, head.format(-5).encode()).startswith(b"HTTP/1.1 400")
        assert raw_exchange(quick, head.format(1 << 40).encode()).startswith(b"HTTP/1.1 413")
        assert raw_exchange(quick, b"") == b""  # an idle connection is closed after the read timeout
        assert time.monotonic() - start < 5


def test_connections_beyond_the_limit_get_503_at_once(served):
    _, engine, tokenizer = served
    with serving(Service(engine, tokenizer, "chatml", "tiny"), max_connections=2) as base:
        port = int(base.rsplit(":", 1)[1])
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # idle: they hold both slots
        try:
            start = time.monotonic()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}/v1/models", timeout=10)
            assert refused.value.code == 503 and time.monotonic() - start < 2
            assert json.loads(refused.value.read())["error"]["code"] == "server_busy"
        finally:
            for sock in holders:
                sock.close()
        for _ in range(50):  # the holders' threads see the close and give their slots back
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
                    assert response.status == 200
                break
            except urllib.error.HTTPError as e:
                assert e.code == 503
                time.sleep(0.1)
        else:
            pytest.fail("slots were not given back")


class GatedEngine:
    """The engine, whose steps can be held at a gate until released; it counts steps and records every request
    submitted to it."""

    def __init__(self, engine):
        self.engine, self.requests, self.steps, self.hold_from = engine, [], 0, 0
        self.open, self.held = threading.Event(), threading.Event()
        self.open.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def hold(self, after: int = 0):
        """Hold the step after `after` more steps."""
        self.hold_from = self.steps + after
        self.held.clear()
        self.open.clear()

    def submit(self, *args, **kwargs):
        request = self.engine.submit(*args, **kwargs)
        self.requests.append(request)
        return request

    def step(self, params=None):
        if not self.open.is_set() and self.steps >= self.hold_from:
            self.held.set()
            assert self.open.wait(60), "the test never released the gate"
        self.steps += 1
        self.engine.step(params)


@pytest.fixture(scope="module")
def gated(model):
    """(base URL, gated engine, service) of a server whose engine has no stop tokens (only the limit ends a
    sequence) and the model's whole context."""
    engine = GatedEngine(make_engine(model))
    service = Service(engine, model[2], "chatml", "tiny", max_waiting=20)
    with serving(service) as base:
        yield base, engine, service


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_sixteen_concurrent_clients_share_the_batch_and_get_their_own_answers(gated):
    """16 clients at once (different prompts and settings) are decoded in one batch, and each gets exactly what
    its request generates alone."""
    base, engine, service = gated
    tokenizer = service.tokenizer
    bodies = [{"messages": [{"role": "user", "content": f"Client {i}: what is {i} + {2 * i}?"}], "max_tokens": 6 + i,
               "temperature": 0.0 if i % 3 == 0 else 0.9, "top_p": 1.0 if i % 2 else 0.8, "seed": 100 + i}
              for i in range(16)]
    engine.hold()  # nothing runs until all 16 wait, so they start in the same step
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = [pool.submit(post, f"{base}/v1/chat/completions", json.dumps(b).encode()) for b in bodies]
        wait_for(lambda: service.worker.waiting() == 16, "the 16 requests never all arrived")
        peak = engine.scheduler.stats()["peak_running"]
        engine.open.set()
        answers = [a.result(timeout=300) for a in answers]
    assert engine.scheduler.stats()["peak_running"] == max(peak, 16)
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200, answer
        ids = encode_chat(tokenizer, body["messages"], "chatml", add_generation_prompt=True).ids.tolist()
        sampling = SamplingParams(temperature=body["temperature"], top_p=body["top_p"])
        alone = engine.engine.generate([ids], body["max_tokens"], sampling, seeds=[body["seed"]])
        assert answer["choices"][0]["message"]["content"] == tokenizer.decode(alone.row(0), skip_special=True)
        assert answer["usage"]["completion_tokens"] == body["max_tokens"]


def test_streamed_text_equals_the_plain_answer_with_the_openai_client(gated):
    openai = pytest.importorskip("openai")
    base, _, _ = gated
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    request = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0.9, seed=7, n=2)
    plain = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    for i, choice in enumerate(plain.choices):
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(pieces) == choice.message.content and len([p for p in pieces if p]) > 1
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == i]
        assert reasons[-1] == choice.finish_reason == "length" and set(reasons[:-1]) == {None}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage == plain.usage
    # Text completions with a stop string: the streamed pieces never show the stop string or what follows it.
    text = client.completions.create(model="tiny", prompt="Count: 1 2 3", max_tokens=30, temperature=0).choices[0].text
    stop = text[10:13]
    expected = client.completions.create(model="tiny", prompt="Count: 1 2 3", max_tokens=30, temperature=0, stop=stop)
    streamed = client.completions.create(model="tiny", prompt="Count: 1 2 3", max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(p for p, _ in pieces) == expected.choices[0].text == text[:text.index(stop)]
    assert pieces[-1][1] == expected.choices[0].finish_reason == "stop"


def test_a_full_queue_answers_429(gated):
    _, engine, service = gated
    small = Service(engine, service.tokenizer, "chatml", "tiny", max_waiting=2)
    with serving(small) as quick:
        engine.hold()
        body = json.dumps({"messages": MESSAGES, "max_tokens": 3, "n": 2}).encode()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, f"{quick}/v1/chat/completions", body)
            wait_for(lambda: small.worker.waiting() == 2, "the first request never queued")
            request = urllib.request.Request(f"{quick}/v1/chat/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            engine.open.set()
            assert first.result(timeout=120)[0] == 200
    assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
    assert json.loads(refused.value.read())["error"]["code"] == "queue_full"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_departed_client_cancels_its_generation_and_frees_its_pages(gated, stream):
    base, engine, _ = gated
    engine.hold(after=2)  # two steps (a prefill and two decode calls), then the client leaves
    body = json.dumps({"prompt": "Count: 1 2 3", "max_tokens": 200, "temperature": 0, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert engine.held.wait(60), "the generation never reached the gate"
    if stream:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "the stream's head and first chunks come first"
    sock.close()
    request = engine.requests[-1]
    wait_for(lambda: request.cancelled, "the server did not notice the client left")
    engine.open.set()
    wait_for(lambda: request.finished, "the cancelled sequence was never dropped")
    assert 0 < len(request.generated) < 200
    assert all(pool.in_use == 0 for pool in engine.scheduler.pools)
    code, answer = post(f"{base}/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 3}).encode())
    assert code == 200, answer


def test_broken_pipes_are_one_log_line(served, caplog, capsys):
    _, engine, tokenizer = served
    server = make_server(Service(engine, tokenizer, "chatml", "tiny"))
    try:
        mine, theirs = socket.socketpair()
        theirs.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        theirs.close()  # gone before the answer: writing it fails with a broken pipe
        with caplog.at_level(logging.INFO):
            server.process_request(mine, ("client", 0))
            deadline = time.monotonic() + 10
            while "connection dropped" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        server.server_close()
    dropped = [r for r in caplog.records if "connection dropped" in r.getMessage()]
    assert len(dropped) == 1 and "BrokenPipeError" in dropped[0].getMessage() and not dropped[0].exc_info
    assert "Traceback" not in caplog.text + capsys.readouterr().err


ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # absl's INFO prefix: I1207 09:49:43.306 ...


def deliverable_sigint() -> None:
    """Ctrl-C as a terminal delivers it, whatever disposition or signal mask the worker running this test has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def serve_command(tmp_path, *args):
    """(base URL, stderr file) of `python -m alignment.serve` on the embedded model, run from a directory other
    than the repository's; stopped with Ctrl-C (SIGINT) on exit."""
    stderr, stdout = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(stderr, "w") as err, open(stdout, "w") as out:
        # -X faulthandler: a hung server dumps its threads' stacks on SIGABRT (below).
        process = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "alignment.serve",
                                    "--config.checkpoint=embedded", "--config.port=0", *args],
                                   stdout=out, stderr=err, cwd=tmp_path, preexec_fn=deliverable_sigint)
    try:
        deadline = time.monotonic() + 120
        while not (address := re.search(r"on (http://\S+)/v1$", stderr.read_text(), re.MULTILINE)):
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        yield address.group(1), stderr
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # Seen twice in the full suite under xdist (never alone or with this file only): the server did not
            # exit after Ctrl-C. Known open problem; kill it and report it rather than hang the suite.
            process.send_signal(signal.SIGABRT)
            process.wait()
            pytest.xfail(f"alignment.serve did not stop within 120 s of SIGINT; stderr: {stderr.read_text()[-3000:]}")
    assert process.returncode == 0 and stdout.read_text() == "", stderr.read_text()


def test_serve_command_prints_its_address_and_requests_and_library_logs_only_when_verbose(tmp_path):
    with serve_command(tmp_path) as (base, stderr):
        assert client.chat(base, MESSAGES, max_tokens=2) is not None
    lines = [line for line in stderr.read_text().splitlines() if not re.match(r"[WE]\d{4} ", line)]  # warnings stay
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines] == [
        f"INFO alignment.serve: serving embedded = default on {base}/v1",
        'INFO alignment.serve: 127.0.0.1 "POST /v1/chat/completions HTTP/1.1" 200 -',
        "INFO alignment.serve: stopped"], lines
    with serve_command(tmp_path, "--verbosity=1") as (_, stderr):
        pass
    assert ABSL_INFO.search(stderr.read_text()), stderr.read_text()


@pytest.mark.parametrize("args, message", [
    (["--config.prot=9000"], "error: unknown config key 'prot'. Did you mean 'port'?"),
    (["--config.port=70000"], "error: config.port=70000 must be >= 0 and <= 65535"),
    (["--config.max_connections=many"], "error: flag --config.max_connections=many: invalid literal for int()"),
    (["--checkpoint=embedded"], "error: Unknown command line flag 'checkpoint' (settings are --config.checkpoint=...)"),
])
def test_serve_command_line_errors_are_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "alignment.serve", "--config.checkpoint=embedded", *args],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1, \
        result.stderr
