"""A minimal client for any OpenAI-compatible chat endpoint (the project's own server, vLLM, a hosted API).

`base_url` is the API root including the version, e.g. http://127.0.0.1:8000/v1, as OpenAI clients take it.
"""
from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from typing import Callable

Messages = list[dict]
GenerateFn = Callable[[list[Messages]], list[str]]


def chat_completion(base_url: str, messages: Messages, *, model: str = "default", timeout: float = 300.0,
                    retries: int = 2, api_key: str = "", **params) -> str:
    """The assistant text of one /chat/completions call. Retries transport errors and 5xx answers with a
    short backoff; a 4xx answer (a bad request will not get better) or the last failure raises RuntimeError
    naming the URL."""
    url = base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, **params}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                payload = json.loads(reply.read().decode())
            return payload["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            if e.code < 500 or attempt == retries:
                raise RuntimeError(f"{url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise RuntimeError(f"{url}: request failed after {retries + 1} attempts: {e}") from None
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise RuntimeError(f"{url}: reply is not an OpenAI chat completion ({e!r})") from None
        time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def endpoint_generate_fn(base_url: str, *, model: str = "default", workers: int = 8, **params) -> GenerateFn:
    """A generate_fn answering each conversation with one chat completion, `workers` requests in flight."""

    def generate(prompts: list[Messages]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(lambda m: chat_completion(base_url, m, model=model, **params), prompts))

    return generate
