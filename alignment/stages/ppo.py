"""PPO with a learned critic: the baseline to GRPO, with the same rollouts and the same KL to the reference.

One RL step (driven by `alignment.rl.loop`, which also evaluates, checkpoints and resumes): draw prompts
by category weight -> `num_samples` completions each (1 is usual for PPO) -> rewards -> score the rollouts
once: the policy's old log-probs and KL to the frozen reference, the critic's old values -> token rewards
(-beta * KL_t, plus the sequence reward at the last token) -> GAE advantages and returns -> `ppo_epochs`
passes of minibatches, each one clipped policy update and one clipped critic update.

The critic is a second Transformer with a value head and its own optimizer: the policy's starting weights
under a fresh head, or `critic.init_from` (an Orbax checkpoint of the same architecture with a value head,
e.g. a reward-model run). Checkpoints hold both states: {"policy": ..., "critic": ...}.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment.algorithms import ppo
from alignment.algorithms.grpo import AGGREGATIONS
from alignment.config import Field, in_range, one_of
from alignment.checkpoint import load_params
from alignment.data.rl_rows import rollout_rows
from alignment.data.tokenizer import checked_tokenizer
from alignment.generation.engine import Engine
from alignment.generation.text import stop_token_ids
from alignment.models import Transformer, lora
from alignment.models.transformer import dummy_inputs
from alignment.rewards.registry import from_config
from alignment.rl import loop
from alignment.rl.rollouts import Rollouts, minibatches, rollout_metrics
from alignment.rl.scoring import KL_ESTIMATORS, make_scorer
from alignment.stages import COMMON_FIELDS
from alignment.train import adapters, runtime
from alignment.train.optimizer import make_optimizer
from alignment.train.state import TrainState, init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step


def init_critic(config, critic: Transformer, optimizer, abstract: TrainState, shardings: TrainState,
                policy_params) -> TrainState:
    """The critic's first state: `critic.init_from`, else the policy's weights under a fresh value head."""
    if config.critic.init_from:
        params = load_params(config.critic.init_from, abstract.params, shardings.params)
    else:
        def policy_trunk(key, policy):
            fresh = nn.meta.unbox(critic.init(key, *dummy_inputs())["params"])  # XLA drops the unused random trunk
            # Copies: the policy's buffers are donated by its updates.
            return dict(fresh, **jax.tree.map(jnp.copy, policy))

        params = jax.jit(policy_trunk, out_shardings=shardings.params)(jax.random.key(config.seed + 1), policy_params)
    return init_state(critic, optimizer, shardings, config.seed + 1, dummy_inputs(), params)


FIELDS = {
    **loop.FIELDS,
    "rl.kl_estimator": one_of(*KL_ESTIMATORS),
    "rl.aggregation": one_of(*AGGREGATIONS),
    "rl.gamma": in_range(0, 1),
    "rl.lam": in_range(0, 1),
    "rl.value_clip": Field(low=0),
    **{f"critic.{key}": field for key, field in COMMON_FIELDS.items() if key.startswith("optimizer.")},
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    rl = config.rl
    model_cfg, model, mesh, rules = runtime.setup_model(config)
    critic = Transformer(dataclasses.replace(model_cfg, value_head=True))
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    stream, held_out = loop.prompt_data(config)

    updates = config.steps * rl.ppo_epochs * rl.minibatches
    optimizer, schedule = make_optimizer(config.optimizer, updates)
    critic_optimizer, critic_schedule = make_optimizer(config.critic.optimizer, updates)
    critic_abstract, critic_shardings = state_shardings(critic, critic_optimizer, mesh, rules, dummy_inputs())
    # A LoRA policy's reference is its frozen base (adapters off); the critic is trained whole.
    policy_abstract, policy_shardings, policy, ref_params = adapters.init_policy(
        config, model, model_cfg, optimizer, mesh, rules, workdir, dummy_inputs())
    state = {"policy": policy, "critic": init_critic(config, critic, critic_optimizer, critic_abstract,
                                                     critic_shardings, lora.dequantize_tree(ref_params))}

    engine = Engine(model_cfg, adapters.sampling_params(policy), mesh, rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template))
    rollouts = Rollouts(config, tokenizer, engine, from_config(config))
    target = runtime.batch_sharding(mesh, rules)
    score = make_scorer(model, rl.temperature, rl.kl_estimator, rl.kl_top_k)
    values = jax.jit(functools.partial(ppo.token_values, critic))
    policy_loss = functools.partial(ppo.policy_loss, model, temperature=rl.temperature, clip_low=rl.clip_low,
                                    clip_high=rl.clip_high, aggregation=rl.aggregation, max_tokens=rl.max_new_tokens)
    critic_loss = functools.partial(ppo.critic_loss, critic, clip=rl.value_clip, aggregation=rl.aggregation,
                                    max_tokens=rl.max_new_tokens)
    # Batches keep the layout `place_batch` gives them (rows over the data axes, whatever their rank).
    policy_update = jit_train_step(make_train_step(policy_loss, optimizer, schedule, config.micro_batches),
                                   policy_shardings, None)
    critic_update = jit_train_step(make_train_step(critic_loss, critic_optimizer, critic_schedule,
                                                   config.micro_batches), critic_shardings, None)

    def rl_step(state, step, rollout):
        t1 = time.perf_counter()
        rows = rollout_rows(rollout.prompt_ids, rollout.out.tokens, rollout.out.lengths, rl.num_samples,
                            rl.max_prompt_length, rl.max_new_tokens)
        rows["loss_mask"] &= rollout.rewards.valid[:, None]  # a skipped sample trains neither model
        batch = runtime.place_batch(rows, target)
        scored = jax.device_get(score(state["policy"].model_params(), ref_params, batch))
        old_values = np.asarray(values(state["critic"].params, batch))
        mask = rows["loss_mask"]
        rewards = ppo.token_rewards(jnp.asarray(np.nan_to_num(rollout.rewards.total)), scored["kl"], mask, rl.beta)
        advantages, returns = ppo.gae(rewards, old_values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = ppo.whiten(advantages, mask)
        rows.update(advantages=np.asarray(advantages), returns=np.asarray(returns), old_values=old_values,
                    old_logp=scored["old_logp"])
        scoring_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        policy_metrics, critic_metrics = [], []
        for minibatch in minibatches(rows, rl, config.seed, step):
            placed = runtime.place_batch(minibatch, target)
            policy, m = policy_update(state["policy"], placed)
            critic_state, c = critic_update(state["critic"], placed)
            state = {"policy": policy, "critic": critic_state}
            policy_metrics.append(m)
            critic_metrics.append(c)
        policy_metrics, critic_metrics = jax.device_get((policy_metrics, critic_metrics))
        fraction = lambda ms, key: float(sum(m[key] for m in ms) / max(sum(m["tokens"] for m in ms), 1.0))
        record = {
            **rollout_metrics(rollout.rewards, rollout.out, scored, mask),
            "loss": float(np.mean([m["loss"] for m in policy_metrics])),
            "value_loss": float(np.mean([m["loss"] for m in critic_metrics])),
            "clip_fraction": fraction(policy_metrics, "clip_fraction_sum"),
            "value_clip_fraction": fraction(critic_metrics, "value_clip_fraction_sum"),
            "first_ratio": float(policy_metrics[0]["ratio_sum"] / max(policy_metrics[0]["tokens"], 1.0)),
            "skipped_samples": int((~rollout.rewards.valid).sum()),
            "scoring_s": scoring_s,
            "update_s": time.perf_counter() - t2,
        }
        return state, record

    abstract = {"policy": policy_abstract, "critic": critic_abstract}
    shardings = {"policy": policy_shardings, "critic": critic_shardings}
    with runtime.activation_context(mesh, rules):
        return loop.run(config, workdir, state=state, abstract=abstract, shardings=shardings, rollouts=rollouts,
                        stream=stream, held_out=held_out, update=rl_step,
                        policy_params=lambda s: adapters.sampling_params(s["policy"]))
