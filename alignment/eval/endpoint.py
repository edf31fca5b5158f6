"""Generation for the evaluation stage from any OpenAI-compatible chat endpoint (the project's own server, vLLM,
a hosted API), through `generation.client.chat`.

`base_url` is the API root, e.g. http://127.0.0.1:8000/v1, as OpenAI clients take it.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable

from alignment.generation.client import chat

Messages = list[dict]
GenerateFn = Callable[[list[Messages], int], list[str]]  # (conversations, max new tokens) -> responses


def endpoint_generate_fn(base_url: str, *, model: str = "default", workers: int = 8, **params) -> GenerateFn:
    """A generate_fn answering each conversation with one chat completion, `workers` requests in flight."""

    def generate(prompts: list[Messages], max_tokens: int) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(lambda m: chat(base_url, m, model=model, max_tokens=max_tokens, **params),
                                 prompts))

    return generate
