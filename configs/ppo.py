"""PPO on the embedded default: the same short SFT warm start and arithmetic task as configs/grpo.py, then
PPO with a critic (the policy's weights under a fresh value head), GAE, value clipping and the paper's
top-K KL to the reference in the token-level reward. Prints held-out accuracy before and after RL and
writes curve.png / curve.jsonl to the workdir.

    python -m alignment.launch --config=configs/ppo.py --workdir=/tmp/ppo
"""
import ml_collections

from alignment_configs import grpo


def get_config():
    c = grpo.get_config()  # the same model, task, data, rewards, optimizer and SFT warm start as GRPO
    c.stage = "ppo"
    del c.ptx_data  # GRPO's PTX penalty; PPO has none
    c.rl = ml_collections.ConfigDict(dict(
        prompts_per_step=64,  # prompts drawn per RL step (by category weight)
        num_samples=1,  # completions per prompt: 1 is usual for PPO, the critic is the baseline
        max_prompt_length=32,  # longer prompts are an error naming the prompt
        max_new_tokens=32,  # completion budget
        temperature=1.0,  # sampling temperature; the trainer scores at the same temperature, no top-k/top-p
        clip_low=0.2,  # PPO clip: ratio >= 1 - clip_low
        clip_high=0.28,  # PPO clip: ratio <= 1 + clip_high
        ppo_epochs=2,  # passes over each rollout batch (with stored old log-probs and values after the first)
        minibatches=2,  # policy and critic optimizer steps per pass
        kl_estimator="top_k",  # top_k (the paper's exact KL over the reference's top-K) | k3: -beta * KL_t per token
        beta=0.02,  # KL weight in the token reward; 0 = no anchor to the reference
        kl_top_k=64,  # K of the reference's top-K support (the paper uses 500 with a 100k+ vocabulary)
        gamma=1.0,  # discount per token
        lam=0.95,  # GAE lambda: 1 = Monte-Carlo returns minus values, 0 = one-step TD errors
        whiten_advantages=True,  # normalise advantages over the completion tokens of the rollout batch
        value_clip=0.2,  # the critic's new values are clipped to old value +- this in the value loss
        aggregation="token_mean",  # token_mean | seq_mean_token_mean | constant, for both losses
        eval_every=20,  # RL steps between held-out evaluations (greedy), which also re-weight categories
        reweight_categories=True,  # shift the prompt mix toward categories with lower held-out accuracy
        correct_threshold=1.0,  # a held-out sample counts as correct when its reward reaches this
    ))
    critic_optimizer = c.optimizer.copy_and_resolve_references()
    critic_optimizer.lr = 1e-3  # a fresh value head has far to go; the critic's trunk learns with it
    c.critic = ml_collections.ConfigDict(dict(
        init_from="",  # '' = the policy's starting weights under a fresh value head; or an Orbax run with a value head (rm)
        optimizer=critic_optimizer,  # the critic's own optimizer (fields as config.optimizer)
    ))
    return c
