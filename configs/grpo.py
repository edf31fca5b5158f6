"""GRPO on the embedded default: a short SFT warm start of the tiny model on generated arithmetic, then
GRPO with a math-answer reward and the paper's top-K KL in the token-level reward. Prints held-out
accuracy before and after RL and writes curve.png / curve.jsonl to the workdir.

The warm-start demonstrations compute correctly but state a wrong final answer (off by one) 60% of the
time, so SFT imitates the mistake; GRPO's verifiable reward is what corrects it.

    python -m alignment.launch --config=configs/grpo.py --workdir=/tmp/grpo
"""
import ml_collections

from alignment.config import base_config, model_preset
from alignment_configs import sft


def get_config():
    c = base_config()
    c.stage = "grpo"
    c.model = model_preset("tiny")
    c.init_from = ""  # policy and reference start here (SFT or merged checkpoint); '' runs warm_start first
    c.steps = 60  # RL steps (each: rollouts, scoring, ppo_epochs x minibatches updates)
    c.batch_size = 1  # unused by GRPO: rows per update come from rl.prompts_per_step x rl.num_samples
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 5
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 20
    c.rl = ml_collections.ConfigDict(dict(
        prompts_per_step=16,  # prompts drawn per RL step (by category weight)
        num_samples=8,  # G: completions per prompt (the paper uses 3)
        max_prompt_length=32,  # longer prompts are an error naming the prompt
        max_new_tokens=32,  # completion budget
        temperature=1.0,  # sampling temperature; the trainer scores at the same temperature, no top-k/top-p
        clip_low=0.2,  # PPO clip: ratio >= 1 - clip_low
        clip_high=0.28,  # PPO clip: ratio <= 1 + clip_high
        ppo_epochs=1,  # mu: passes over each rollout batch (with stored old log-probs after the first)
        minibatches=1,  # optimizer steps per pass
        kl_mode="token_reward",  # token_reward (the paper: -beta * top-K KL per token) | k3 (in the loss) | none
        kl_importance_ratio=False,  # k3 mode: k3 times exp(logp - old_logp), TRL's default use_bias_correction_kl
        beta=0.02,  # KL weight
        kl_top_k=64,  # K of the reference's top-K support (the paper uses 500 with a 100k+ vocabulary)
        scale_rewards="group",  # group | batch | none: what the centred rewards are divided by
        advantage_estimator="grpo",  # grpo (group mean baseline) | rloo (leave-one-out)
        aggregation="token_mean",  # token_mean | seq_mean_token_mean | constant (Dr. GRPO)
        policy_loss="ppo_clip",  # ppo_clip | gspo (one ratio per sequence) | cispo (clipped, detached IS weight)
        ptx_gamma=0.0,  # weight of the PTX replacement KL(policy || reference) on SFT batches; 0 = off
        ptx_batch_size=8,  # SFT rows per PTX step
        eval_every=20,  # RL steps between held-out evaluations (greedy), which also re-weight categories
        reweight_categories=True,  # shift the prompt mix toward categories with lower held-out accuracy
        correct_threshold=1.0,  # a held-out sample counts as correct when its reward reaches this
        max_staleness=0,  # k: step s samples from the parameters after s - k updates, made while earlier steps train
        rollout_devices=0,  # n > 0: the first n devices sample (parameters copied after each update), the rest train
        rollout_dtype="",  # compute dtype of sampling: '' (the model's) | float32 | bfloat16
        is_correction="none",  # none | tis (truncated) | mis (masked): importance weights pi_old / sampler
        is_level="token",  # token | sequence (the product of the sequence's token ratios)
        is_low=0.0,  # weights below this are truncated up to it (tis) or masked (mis)
        is_high=2.0,  # weights above this are truncated down to it (tis) or masked (mis)
        dynamic_sampling=False,  # DAPO: drop groups whose rewards are all equal, draw more prompts to fill the batch
        dynamic_sampling_max_draws=3,  # at most this many draws of prompts_per_step prompts per step
        overlong="none",  # none | mask (truncated completions out of the loss) | penalty (DAPO's soft penalty)
        overlong_buffer=8,  # penalty: it falls from 0 to -overlong_penalty over the last this many tokens
        overlong_penalty=1.0,  # penalty at max_new_tokens
    ))
    c.rewards = ml_collections.ConfigDict(dict(math=dict(weight=1.0)))  # name -> weight and parameters
    c.reward_on_error = "zero"  # zero | raise | skip: what a reward function that raises scores
    c.data = ml_collections.ConfigDict(dict(
        train=ml_collections.ConfigDict(dict(math=sft.source("embedded", num_ops=1))),  # category -> prompt source
        eval=ml_collections.ConfigDict(dict(math=sft.source("embedded", num_ops=1))),  # held-out prompts per category
        num_embedded=2000,  # generated prompts for an 'embedded' source
        num_embedded_eval=128,  # generated held-out prompts
    ))
    c.ptx_data = sft.get_config().data  # SFT data for the PTX-KL penalty (used when rl.ptx_gamma > 0)
    warm = sft.get_config()  # the SFT warm start run when init_from is empty
    warm.steps = 300
    warm.data.train = ml_collections.ConfigDict(dict(math=sft.source("embedded", num_ops=1, answer_noise=0.6)))
    warm.data.eval = ml_collections.ConfigDict(dict(math=sft.source("embedded", num_ops=1, answer_noise=0.6)))
    c.warm_start = warm
    return c
