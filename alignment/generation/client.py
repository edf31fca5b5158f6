"""A minimal client for OpenAI-compatible chat endpoints (this project's server, vLLM, ...), standard library only.

    chat("http://127.0.0.1:8000", [{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=64) -> "Hello"
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


def chat(base_url: str, messages: list[dict], **options) -> str:
    """The first choice's message content of POST {base_url}/v1/chat/completions (see `chat_message`)."""
    return chat_message(base_url, messages, **options)["content"]


def chat_message(base_url: str, messages: list[dict], *, timeout: float = 600.0, retries: int = 2, api_key: str = "",
                 **params) -> dict:
    """The first choice's message of POST {base_url}/v1/chat/completions (content, and tool_calls if any).

    base_url may end with or without /v1. params go into the request body as they are (model, max_tokens,
    temperature, top_p, stop, seed, ...). Transport errors and 5xx answers are retried `retries` times with a
    short backoff; a 4xx answer (a bad request will not get better), a non-JSON or malformed answer, or the last
    failure raises RuntimeError naming the URL and carrying the server's message.
    """
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps({"messages": messages, **params}).encode()
    for attempt in range(retries + 1):
        last = attempt == retries
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.loads(response.read())
            break
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            if e.code < 500 or last:
                raise RuntimeError(f"{url}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            if last:
                raise RuntimeError(f"{url}: cannot connect ({e.reason})") from None
        except (TimeoutError, OSError) as e:  # a read timeout or a dropped connection after connecting
            if last:
                raise RuntimeError(f"{url}: no answer ({type(e).__name__}: {e})") from None
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{url}: the answer is not JSON ({e})") from None
        time.sleep(0.5 * 2 ** attempt)
    try:
        message = body["choices"][0]["message"]
        return {**message, "content": message["content"]}  # content is null when the model only called tools
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"{url}: unexpected response {json.dumps(body)[:500]}") from None
