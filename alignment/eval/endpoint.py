"""Generation for the evaluation stage from any OpenAI-compatible chat endpoint (the project's own server, vLLM,
a hosted API), through `generation.client.chat`.

`base_url` is the API root, e.g. http://127.0.0.1:8000/v1, as OpenAI clients take it.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable

from alignment.eval.function_calling import calls_as_text
from alignment.generation.client import chat, chat_message

Messages = list[dict]
# (conversations, max new tokens[, tools=one definitions list or None per conversation]) -> responses
GenerateFn = Callable[..., list[str]]


def endpoint_generate_fn(base_url: str, *, model: str = "default", workers: int = 8, **params) -> GenerateFn:
    """A generate_fn answering each conversation with one chat completion, `workers` requests in flight. With
    `tools`, they are sent with the request and the answer's tool_calls come back as text (`calls_as_text`)."""

    def one(messages: Messages, tools: list | None, max_tokens: int) -> str:
        if tools:
            return calls_as_text(chat_message(base_url, messages, model=model, max_tokens=max_tokens, tools=tools,
                                              **params))
        return chat(base_url, messages, model=model, max_tokens=max_tokens, **params)

    def generate(prompts: list[Messages], max_tokens: int, tools: list | None = None) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(lambda m, t: one(m, t, max_tokens), prompts, tools or [None] * len(prompts)))

    return generate
