"""Build the generate_fn(prompts: list[messages]) -> list[str] that evaluation calls.

From an OpenAI-compatible endpoint (any server, the project's own `alignment.serve` included), or from a
checkpoint directory run in-process by the rollout engine; optionally with the prompt-augmentation (PAS)
model in front, which appends its complementary instruction to the last user turn.
"""
from __future__ import annotations

import ml_collections

from alignment.eval.endpoint import GenerateFn, endpoint_generate_fn


def is_endpoint(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def with_prompt_augmentation(generate_fn: GenerateFn, pas) -> GenerateFn:
    """PAS in front of the model: each prompt's last user turn gets the PAS complement appended (the original
    prompt is kept whole and the complement follows it)."""

    def generate(prompts: list[list[dict]]) -> list[str]:
        return generate_fn(pas.augment_chats(prompts))

    return generate


def local_generate_fn(config: ml_collections.ConfigDict, checkpoint: str) -> GenerateFn:
    """Greedy or sampled generation with the in-process rollout engine from `checkpoint` (HF or Orbax)."""
    try:
        from alignment.generation.engine import Engine
        from alignment.generation.sampling import SamplingParams
        from alignment.generation.text import stop_token_ids
    except ImportError as e:
        raise ValueError(f"checkpoint {checkpoint!r} needs the local rollout engine (alignment.generation), "
                         f"which is unavailable ({e}); serve the checkpoint and give its URL instead") from None
    import flax.linen as nn

    from alignment import sharding
    from alignment.data.chat import encode_chat
    from alignment.data.tokenizer import load_tokenizer
    from alignment.models import Transformer
    from alignment.models.transformer import dummy_inputs
    from alignment.train import runtime
    from alignment.train.state import abstract_params

    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = checkpoint
    model_cfg = runtime.model_config(config)
    mesh, rules = runtime.mesh_and_rules(config)
    model = Transformer(model_cfg)
    boxed = abstract_params(model, dummy_inputs())
    params = runtime.initial_params(config, model_cfg, nn.meta.unbox(boxed),
                                    sharding.param_shardings(boxed, mesh, rules))
    tokenizer = load_tokenizer(config.tokenizer)
    engine = Engine(model_cfg, params, mesh, rules, pad_id=tokenizer.pad_id or 0,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template))
    g = config.generation
    sampling = SamplingParams(temperature=g.temperature)

    def generate(prompts: list[list[dict]]) -> list[str]:
        ids = [encode_chat(tokenizer, m, config.chat_template, add_generation_prompt=True).ids.tolist()
               for m in prompts]
        out = engine.generate(ids, g.max_tokens, sampling, seeds=config.seed)
        return [tokenizer.decode(out.row(i), skip_special=True) for i in range(len(prompts))]

    return generate


def make_generate_fn(config: ml_collections.ConfigDict, target: str, name: str) -> GenerateFn:
    g = config.generation
    if is_endpoint(target):
        generate_fn = endpoint_generate_fn(target, model=name, workers=g.workers, temperature=g.temperature,
                                           max_tokens=g.max_tokens, timeout=g.timeout)
    else:
        generate_fn = local_generate_fn(config, target)
    if config.pas.target:
        from alignment.pas.augment import load_pas

        generate_fn = with_prompt_augmentation(generate_fn, load_pas(config.pas.target, config.pas.max_tokens,
                                                                     config.pas.model))
    return generate_fn
