"""PAS inference: put the prompt-augmentation model in front of any main model.

    pas = load_pas("/tmp/pas/pas_model")               # a trained PAS run (or "http://host:port" of a served one)
    pas.complement("Write a poem about the sea.")      # -> 'Write about the sea with vivid, concrete detail ...'
    pas.augment("Write a poem about the sea.")         # -> the prompt, a blank line, then the complement

The command line is `python -m alignment.pas` (see alignment/pas/__main__.py).
"""
from __future__ import annotations

import abc
import os
from typing import Sequence


from alignment.data.chat import encode_chat
from alignment.generation.client import chat
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish
from alignment.pas.template import combine, last_user_turn, pas_messages, with_complement


class Pas(abc.ABC):
    """complement(prompt, keywords) from a PAS model; augment() joins it to the prompt (see template.combine)."""

    @abc.abstractmethod
    def complements(self, prompts: Sequence[str], keywords: Sequence[Sequence[str]] | None = None) -> list[str]:
        """One complement per prompt (keywords: per prompt, the search keywords of a retrieval-augmented one)."""

    def complement(self, prompt: str, keywords: Sequence[str] = ()) -> str:
        return self.complements([prompt], [keywords])[0]

    def augment(self, prompt: str, keywords: Sequence[str] | None = None) -> str:
        return combine(prompt, self.complement(prompt, keywords or ()))

    def augment_chats(self, chats: Sequence[list[dict]], keywords: Sequence[Sequence[str]] | None = None
                      ) -> list[list[dict]]:
        """Each chat with the complement of its last user turn appended to that turn, from one batched
        `complements` call."""
        texts = [chat[last_user_turn(chat)]["content"] for chat in chats]
        return [with_complement(chat, c) for chat, c in zip(chats, self.complements(texts, keywords))]

    def augment_messages(self, messages: list[dict], keywords: Sequence[str] = ()) -> list[dict]:
        """A chat with the complement appended to its last user turn."""
        return self.augment_chats([messages], [keywords])[0]


class LocalPas(Pas):
    """A PAS model trained by the pas stage (its pas_model run directory, or that run's checkpoints), run
    in-process by the rollout engine."""

    def __init__(self, path: str, max_new_tokens: int = 64, batch_size: int = 32):
        from alignment.generation.loading import build_engine, checkpoint_config

        config = checkpoint_config(path)
        if not os.path.isdir(config.init_from):
            raise FileNotFoundError(f"{path} is not a PAS model run (train one with configs/pas.py; the model is "
                                    "<workdir>/pas_model)")
        self.engine, self.tokenizer = build_engine(config)
        self.template, self.max_new_tokens, self.batch_size = config.chat_template, max_new_tokens, batch_size

    def complements(self, prompts: Sequence[str], keywords: Sequence[Sequence[str]] | None = None) -> list[str]:
        keywords = keywords or [()] * len(prompts)
        ids = [encode_chat(self.tokenizer, pas_messages(p, k), self.template, add_generation_prompt=True).ids
               .tolist() for p, k in zip(prompts, keywords)]
        room = self.engine.max_len - self.max_new_tokens
        too_long = [i for i, x in enumerate(ids) if len(x) > room]
        if too_long:
            raise ValueError(f"prompt {too_long[0]} (and {len(too_long) - 1} more) leaves no room for "
                             f"{self.max_new_tokens} complement tokens in the PAS model's {self.engine.max_len}")
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            result = self.engine.generate(chunk, self.max_new_tokens, SamplingParams(temperature=0.0))
            out += [finish(self.tokenizer, result.row(i), bool(result.stopped[i]))["text"].strip()
                    for i in range(len(chunk))]
        return out


class EndpointPas(Pas):
    """A PAS model behind an OpenAI-compatible endpoint (e.g. `python -m alignment.serve` on the PAS run)."""

    def __init__(self, url: str, model: str = "default", max_new_tokens: int = 64, timeout: float = 120.0):
        self.url, self.model, self.max_new_tokens, self.timeout = url, model, max_new_tokens, timeout

    def complements(self, prompts: Sequence[str], keywords: Sequence[Sequence[str]] | None = None) -> list[str]:
        keywords = keywords or [()] * len(prompts)
        return [chat(self.url, pas_messages(p, k), model=self.model, temperature=0.0, max_tokens=self.max_new_tokens,
                     timeout=self.timeout).strip() for p, k in zip(prompts, keywords)]


class EmbeddedPas(Pas):
    """The embedded teacher's template complements in-process (never flawed): a stand-in PAS model for running the
    command line offline with no trained model. Its complements are templates, not a language model's."""

    def complements(self, prompts: Sequence[str], keywords: Sequence[Sequence[str]] | None = None) -> list[str]:
        from alignment.pas.teacher import TeacherService

        teacher, keywords = TeacherService(flaw_rate=0.0), keywords or [()] * len(prompts)
        return [teacher.complement(p, "", k) for p, k in zip(prompts, keywords)]


EMBEDDED = "embedded"


def load_pas(target: str, max_new_tokens: int = 64, model: str = "default") -> Pas:
    """A PAS model from a run directory, an http(s) URL, or EMBEDDED (the embedded teacher's templates)."""
    if target == EMBEDDED:
        return EmbeddedPas()
    if target.startswith(("http://", "https://")):
        return EndpointPas(target, model, max_new_tokens)
    return LocalPas(target, max_new_tokens)
