"""The OpenAI-compatible server answers real HTTP clients on localhost; bad requests get 4xx JSON errors."""
import json
import threading
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
from alignment.generation.text import stop_token_ids
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.serve import Service, engine_config, make_server

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
MAX_LEN = 64  # a short context makes the over-long case cheap


@pytest.fixture(scope="module")
def served():
    config = ModelConfig.from_dict(model_preset("tiny").to_dict())
    model = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"]))(jax.random.key(0))
    tokenizer = load_tokenizer("embedded")
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    engine = Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, "chatml"), max_len=MAX_LEN)
    server = make_server(Service(engine, tokenizer, "chatml", "tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", engine, tokenizer
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


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
    request = {"prompt": render_chat_text(MESSAGES, "chatml", add_generation_prompt=True), "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 4, "n": 2}
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
    (json.dumps({"messages": MESSAGES, "top_p": 0}).encode(), 400, "'top_p' must be"),
    (json.dumps({"messages": MESSAGES, "n": 0}).encode(), 400, "'n' must be"),
    (json.dumps({"messages": MESSAGES, "stream": True}).encode(), 400, "streaming is not supported"),
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
    assert engine_config("embedded").tokenizer == "embedded"
    (tmp_path / "config.json").write_text("{}")
    hf = engine_config(str(tmp_path))
    assert hf.init_from == str(tmp_path) and hf.tokenizer == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine_config(str(tmp_path / "missing"))
