"""DPO and the reward model with LoRA: the DPO reference is the base with adapters off (no copy), equal to a
separate frozen copy's log-probs; the policy starts at the reference (loss log 2) and moves; the RM trains its
value head whole beside the adapters."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from alignment import stages
from alignment.algorithms import dpo
from alignment.data import preference
from alignment.models.transformer import dummy_inputs
from alignment.train import adapters, runtime
from alignment.train.optimizer import make_optimizer
from tests.stages.test_rm_and_dpo import stage_config, train_records

LORA = {"lora.enabled": True, "lora.rank": 4, "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0}


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path):
    runs = {}
    for mode in ("precomputed", "online"):
        config = stage_config("dpo", reference=mode, **LORA)
        stages.run("dpo", config, str(tmp_path / mode))
        runs[mode] = [r["loss"] for r in train_records(tmp_path / mode)]
    assert runs["precomputed"][0] == pytest.approx(np.log(2), abs=1e-6)  # B = 0: the policy is the reference
    np.testing.assert_allclose(runs["online"], runs["precomputed"], rtol=1e-5)
    assert abs(runs["online"][-1] - np.log(2)) > 1e-4  # the adapters moved the policy

    # The trained run's state, resumed: adapters-off log-probs equal those of a separately initialised base copy.
    config = stage_config("dpo", reference="online", **LORA)
    model_cfg, model, mesh, rules = runtime.setup_model(config)
    optimizer, _ = make_optimizer(config.optimizer, config.steps)
    checkpointer, state, _, _ = adapters.resume_or_init(config, str(tmp_path / "online"), model, model_cfg,
                                                        optimizer, mesh, rules, dummy_inputs())
    checkpointer.close()
    assert int(state.step) == config.steps
    copy = nn.meta.unbox(model.init(jax.random.split(jax.random.key(config.seed))[0], *dummy_inputs())["params"])
    train_rows, _, _ = preference.prepare_data(config, model_cfg.vocab_size)
    batch = preference.compact(next(iter(preference.fixed_batches(train_rows, 8))), 1, 0)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    logps = jax.jit(functools.partial(dpo.sequence_logps, model))
    reference, separate = logps(state.frozen, batch)[0], logps(copy, batch)[0]
    np.testing.assert_allclose(np.asarray(reference), np.asarray(separate), rtol=1e-6, atol=1e-6)
    policy = logps(state.model_params(), batch)[0]
    assert float(np.abs(np.asarray(policy) - np.asarray(reference)).max()) > 1e-3


def test_reward_model_with_lora_trains_the_value_head(tmp_path):
    summary = stages.run("rm", stage_config("rm", steps=4, **LORA), str(tmp_path))
    records = train_records(tmp_path)
    assert np.isfinite(records[-1]["loss"]) and "accuracy" in summary["final_eval"]
    import orbax.checkpoint as ocp
    saved = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "4" / "state"))
    assert sorted(saved["params"]["full"]) == ["value_bias", "value_kernel"]
    assert np.abs(saved["params"]["full"]["value_kernel"]).max() > 0


def test_grpo_with_lora_samples_base_plus_adapters_against_the_base(tmp_path, space_share_reward):
    """Step 0: the policy is the reference (B = 0), so the KL is 0; the adapters then move it (KL > 0) while the
    reference stays the base; checkpoints hold the adapters only, and a restart resumes from them."""
    from tests.stages.test_grpo import config as grpo_config, train_records as grpo_records
    import orbax.checkpoint as ocp

    c = grpo_config(4)
    c.lora.enabled, c.lora.rank, c.optimizer.lr = True, 4, 3e-2
    c.checkpoint.every = 2
    stages.run("grpo", c, str(tmp_path))
    records = grpo_records(tmp_path)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[-1]["kl"] > 1e-6, records
    saved = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "4" / "state"))
    assert sorted(saved["params"]) == ["full", "lora"] and saved.get("frozen") is None
    c.steps = 5  # resumes from step 4's adapters on the same base
    stages.run("grpo", c, str(tmp_path))
    assert len(grpo_records(tmp_path)) == 5


def test_ppo_with_lora_policy_resumes_from_adapters_and_critic(tmp_path, space_share_reward):
    """PPO: LoRA policy (reference = its base, adapters off) beside a fully trained critic; the checkpoint
    holds the policy's adapters and the critic, and a restart resumes from them."""
    from tests.stages.test_ppo import config as ppo_config, train_records as ppo_records
    import orbax.checkpoint as ocp

    c = ppo_config(3)
    c.lora.enabled, c.lora.rank, c.lora.quantize = True, 4, "int8"
    stages.run("ppo", c, str(tmp_path))
    records = ppo_records(tmp_path)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[-1]["kl"] > 1e-6, records
    saved = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "3" / "state"))
    assert sorted(saved["policy"]["params"]) == ["full", "lora"] and saved["policy"].get("frozen") is None
    assert "embed" in saved["critic"]["params"]
    c.steps = 4
    stages.run("ppo", c, str(tmp_path))
    assert len(ppo_records(tmp_path)) == 4
