"""From generated token ids to text: stop tokens of a chat template, stop strings, finish reasons."""
from __future__ import annotations

from typing import Sequence

from alignment.data.tokenizer import Tokenizer

# The token that ends an assistant turn in each chat template (llama2 ends turns with the tokenizer's EOS).
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": None}


def stop_token_ids(tokenizer: Tokenizer, template: str, stop: Sequence[str] = ()) -> list[int]:
    """EOS, the template's end-of-turn token, and every stop string that is a single token of the vocabulary.

    Stop strings spanning several tokens are found in the text afterwards (`finish`); single-token ones also end
    the row inside the decode loop, so no compute is spent past them.
    """
    ids = {tokenizer.eos_id}
    for piece in [END_OF_TURN.get(template), *stop]:
        i = tokenizer.token_id(piece) if piece else None
        if i is not None:
            ids.add(i)
    return sorted(ids)


def finish(tokenizer: Tokenizer, tokens: Sequence[int], stopped: bool, stop: Sequence[str] = ()) -> dict:
    """{"text", "num_tokens", "finish_reason"} of one completion, OpenAI style.

    A final stop token is not part of the text. The text is cut before the first stop string it contains (the
    stop string is not included) and num_tokens then counts the tokens up to the one completing it.
    finish_reason is "stop" (stop token or stop string) or "length" (token limit reached).
    """
    tokens = list(tokens)
    body = tokens[:-1] if stopped else tokens
    text = tokenizer.decode(body, skip_special=True)
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if not cuts:
        return {"text": text, "num_tokens": len(tokens), "finish_reason": "stop" if stopped else "length"}
    at, string = min(cuts)
    used = next(n for n in range(1, len(body) + 1)
                if string in tokenizer.decode(body[:n], skip_special=True))
    return {"text": text[:at], "num_tokens": used, "finish_reason": "stop"}
