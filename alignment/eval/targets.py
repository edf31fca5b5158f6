"""Build the generate_fn(prompts: list[messages]) -> list[str] that evaluation calls.

From an OpenAI-compatible endpoint (any server, the project's own `alignment.serve` included), or from a
checkpoint directory run in-process by the rollout engine; optionally with the prompt-augmentation (PAS)
model in front, which appends its complementary instruction to the last user turn.
"""
from __future__ import annotations

import ml_collections

from alignment.eval.endpoint import GenerateFn, endpoint_generate_fn


EMBEDDED = "embedded"  # a target that is config.model at random init (seed config.seed): the offline default


def is_endpoint(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def with_prompt_augmentation(generate_fn: GenerateFn, pas) -> GenerateFn:
    """PAS in front of the model: each prompt's last user turn gets the PAS complement appended (the original
    prompt is kept whole and the complement follows it)."""

    def generate(prompts: list[list[dict]], max_tokens: int, **options) -> list[str]:
        return generate_fn(pas.augment_chats(prompts), max_tokens, **options)

    return generate


def local_generate_fn(config: ml_collections.ConfigDict, checkpoint: str) -> GenerateFn:
    """Greedy or sampled generation with the in-process rollout engine from `checkpoint` (a run's workdir, its
    checkpoints directory, an HF directory, or EMBEDDED: config.model at random init), with the checkpoint's
    tokenizer and chat template unless the config names them. Texts are cut as RL rollouts cut them (`finish`),
    so a score here is the one training logged."""
    from alignment.data.chat import encode_chat
    from alignment.generation.loading import build_engine
    from alignment.generation.sampling import SamplingParams
    from alignment.generation.text import finish

    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = "" if checkpoint == EMBEDDED else checkpoint
    engine, tokenizer = build_engine(config)
    g = config.generation
    sampling = SamplingParams(temperature=g.temperature)

    def generate(prompts: list[list[dict]], max_tokens: int, tools: list | None = None) -> list[str]:
        ids = [encode_chat(tokenizer, m, config.chat_template, add_generation_prompt=True, tools=t).ids.tolist()
               for m, t in zip(prompts, tools or [None] * len(prompts))]
        out = engine.generate(ids, max_tokens, sampling, seeds=config.seed)
        return [finish(tokenizer, out.row(i), bool(out.stopped[i]))["text"] for i in range(len(prompts))]

    return generate


def make_generate_fn(config: ml_collections.ConfigDict, target: str, name: str) -> GenerateFn:
    g = config.generation
    if is_endpoint(target):
        generate_fn = endpoint_generate_fn(target, model=name, workers=g.workers, temperature=g.temperature,
                                           timeout=g.timeout)
    else:
        generate_fn = local_generate_fn(config, target)
    if config.pas.target:
        from alignment.pas.augment import load_pas

        generate_fn = with_prompt_augmentation(generate_fn, load_pas(config.pas.target, config.pas.max_tokens,
                                                                     config.pas.model))
    return generate_fn
