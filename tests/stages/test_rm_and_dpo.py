"""Preference losses through the model: packed vs separate sequences, reference paths, short stage runs."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from alignment import sharding
from alignment.algorithms import dpo, rm
from alignment.config import load_config_file
from alignment.data import model_info, preference
from alignment.data.tokenizer import load_tokenizer
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.rewards.reward_model import load_reward_model
from alignment.train.step import accumulate_gradients

MICRO = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(ModelConfig(**MICRO, value_head=True))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                          model.init(jax.random.key(1), *dummy_inputs())["params"])
    return model, params


@pytest.fixture(scope="module")
def rows():
    encoder = preference.Encoder(load_tokenizer("embedded"), "chatml", max_length=40)
    records = preference.embedded_records(6, seed=3)
    out = []
    for r in records:
        pair = preference.record_to_pairs(r, (1, 10))[0]
        stats = preference.PreferenceStats()
        out.append((encoder.sequence(pair.prompt, pair.chosen, stats), encoder.sequence(pair.prompt, pair.rejected,
                                                                                        stats)))
    return out


def single(seq, length):
    """A row holding only `seq` as segment 1."""
    row = preference.pack_two(seq, (np.zeros(0, np.int32), np.zeros(0, bool)), length)
    return row


def test_packed_pair_matches_separate_sequences(model_and_params, rows):
    model, params = model_and_params
    packed = preference.stack([preference.pack_two(a, b, 80) for a, b in rows])
    alone_a = preference.stack([single(a, 80) for a, _ in rows])
    alone_b = preference.stack([single(b, 80) for _, b in rows])
    logps = jax.jit(lambda p, b: dpo.sequence_logps(model, p, b))
    (lp, ln), (la, lna), (lb, lnb) = (logps(params, b) for b in (packed, alone_a, alone_b))
    np.testing.assert_allclose(np.asarray(lp[:, 0]), np.asarray(la[:, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp[:, 1]), np.asarray(lb[:, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ln), np.stack([np.asarray(lna[:, 0]), np.asarray(lnb[:, 0])], 1))
    # Reward-model scores too: the last token of each packed sequence sees only its own sequence.
    rewards = jax.jit(lambda p, b: rm.pair_rewards(model, p, b))
    rp, ra, rb = (np.asarray(rewards(params, b)) for b in (packed, alone_a, alone_b))
    np.testing.assert_allclose(rp, np.stack([ra[:, 0], rb[:, 0]], 1), rtol=1e-5, atol=1e-5)


def pair_batch(rows, share_prefix=False):
    """The fixture's pairs as one-pair rows plus every per-pair field the RM and DPO losses read."""
    return preference.stack([dict(preference.pack_two(a, b, 80, share_prefix), chosen_score=np.float32(0.1 * i),
                                  rejected_score=np.float32(0.9 - 0.1 * i), has_score=np.float32(i % 2),
                                  margin=np.float32(0.2 * i), ref_logps=np.asarray([-30.0 - i, -28.0 + i], np.float32))
                             for i, (a, b) in enumerate(rows)])


def test_pack_pairs_layout(rows):
    batch = pair_batch(rows)
    packed = preference.pack_pairs(batch, 3)  # 6 pairs -> 2 rows; row r holds pairs r, r + 2, r + 4
    assert packed["segment_ids"].shape == (2, 240) and packed["margin"] is batch["margin"]
    for r in range(2):
        start = 0
        for j, pair in enumerate((r, r + 2, r + 4)):
            n = int((batch["segment_ids"][pair] > 0).sum())
            for key in preference.SEQUENCE_FIELDS:
                expected = batch[key][pair, :n] + (2 * j if key == "segment_ids" else 0)
                np.testing.assert_array_equal(packed[key][r, start:start + n], expected)
            start += n
        assert not packed["segment_ids"][r, start:].any()
    per_segment = np.arange(12).reshape(2, 6)  # [rows, 2k]: pair j of row r in columns 2j, 2j + 1
    np.testing.assert_array_equal(preference.pair_columns(per_segment, 3),
                                  [[0, 1], [6, 7], [2, 3], [8, 9], [4, 5], [10, 11]])
    with pytest.raises(ValueError, match="pairs_per_row=4 must be >= 1 and divide the 6 pairs"):
        preference.pack_pairs(batch, 4)


@pytest.mark.parametrize("attention_impl", ["xla", "xla_flash"])
def test_several_pairs_per_row_give_the_same_losses_and_gradients(rows, attention_impl):
    """RM and DPO losses and gradients of 6 pairs packed 1, 2, 3 or 6 to a row agree (fp32, 1e-5), also when
    the packed rows are split into micro-batches, and with each pair's shared prompt held once (share_prefix)."""
    model = Transformer(ModelConfig(**MICRO, value_head=True, attention_impl=attention_impl))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                          model.init(jax.random.key(2), *dummy_inputs())["params"])
    batch, shared = pair_batch(rows), pair_batch(rows, share_prefix=True)
    assert (shared["segment_ids"] > 0).sum() < (batch["segment_ids"] > 0).sum()  # the prompts are shared
    losses = {"dpo": functools.partial(dpo.dpo_loss, model, beta=0.1),
              "rm": functools.partial(rm.reward_loss, model, alpha=0.5, use_margin=True)}
    for name, loss_fn in losses.items():
        grad_fn = jax.jit(functools.partial(accumulate_gradients, loss_fn), static_argnums=3)
        expected_grads, expected_loss, expected_count, _ = grad_fn(params, batch, jax.random.key(0), 1)
        assert float(expected_count) == 6
        for source, k, micro in ((batch, 2, 1), (batch, 3, 1), (batch, 6, 1), (batch, 3, 2),
                                 (shared, 1, 1), (shared, 3, 2)):
            packed = preference.compact(source, k, 16)
            assert packed["segment_ids"].shape[0] == 6 // k
            grads, loss, count, _ = grad_fn(params, packed, jax.random.key(0), micro)
            assert float(count) == 6
            where = f"{name} k={k} micro={micro} shared={source is shared}"
            np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5, err_msg=where)
            for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
                np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6, err_msg=where)


def test_pairs_per_row_must_divide_the_batch(monkeypatch):
    config = stage_config("rm", **{"data.pairs_per_row": 3})
    with pytest.raises(ValueError, match="data.pairs_per_row=3 must divide batch_size=8"):
        preference.prepare_data(config, 1024)
    config = stage_config("rm", micro_batches=4, **{"data.pairs_per_row": 4})  # 2 rows do not split into 4
    with pytest.raises(ValueError, match="micro_batches=4 divides"):
        preference.prepare_data(config, 1024)
    mesh = sharding.make_mesh({"data": 8})
    target = sharding.named_sharding(mesh, sharding.DEFAULT_RULES, "batch", "seq")
    with pytest.raises(ValueError, match=r"rows per micro-batch \(batch_size / data.pairs_per_row / micro_batches\)"):
        preference.check_rows_split(stage_config("rm", **{"data.pairs_per_row": 4}), target)  # 2 rows, 8 devices
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # each process would pack its own pairs
    with pytest.raises(ValueError, match="runs on one process only"):
        preference.check_rows_split(stage_config("rm", **{"data.pairs_per_row": 2}), target)


def test_sequence_logps_match_a_float64_numpy_forward_of_the_logits(model_and_params, rows):
    """Summed completion log-probs equal log-softmax of the model's logits (float64) at the masked targets."""
    model, params = model_and_params
    batch = preference.stack([preference.pack_two(a, b, 80) for a, b in rows[:2]])
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(model.apply({"params": params}, hidden, method="logits"), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["loss_mask"]
    expected = np.stack([[picked[r][batch["segment_ids"][r] == k].sum() for k in (1, 2)] for r in range(2)])
    got, _ = dpo.sequence_logps(model, params, batch)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


def stage_config(stage, workdir_steps=3, **overrides):
    c = load_config_file(f"configs/{stage}.py")
    c.model.update(MICRO)
    c.batch_size, c.steps, c.log_every, c.eval_every = 8, workdir_steps, 1, 0
    c.data.num_embedded, c.data.num_embedded_eval = 48, 16
    c.data.max_length, c.data.trim_multiple = 40, 0  # one row shape: one compile per jitted function
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        target, name = c, key
        while "." in name:
            head, name = name.split(".", 1)
            target = target[head]
        target[name] = value
    model_info.resolve(c)  # the tokenizer and template '' stand for (what stages.run does first)
    return c


def train_records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"train"' in line]


def test_precomputed_and_online_reference_give_the_same_losses(tmp_path):
    from alignment import stages
    from alignment.stages import dpo as dpo_stage

    runs = {}
    for mode in dpo_stage.REFERENCE:
        workdir = tmp_path / mode
        workdir.mkdir()
        packing = {"data.pairs_per_row": 2} if mode == "online" else {}  # same losses with 2 pairs per row
        summary = stages.run("dpo", stage_config("dpo", reference=mode, batch_size=16, **packing), str(workdir))
        runs[mode] = (train_records(workdir), summary["final_eval"])
    (pre, pre_eval), (online, online_eval) = runs["precomputed"], runs["online"]
    assert len(pre) == len(online) == 3
    for a, b in zip(pre, online):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["margin"] == pytest.approx(b["margin"], rel=1e-4, abs=1e-6)
    assert pre[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 0
    assert pre_eval["loss"] == pytest.approx(online_eval["loss"], rel=1e-5)


def test_kto_stage_runs(tmp_path):
    from alignment import stages

    summary = stages.run("dpo", stage_config("dpo", loss="kto", steps=2), str(tmp_path))
    records = train_records(tmp_path)
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) at the reference
    assert summary["data"]["train"]["examples"] == 2 * 48 and "kl" in summary["final_eval"]


def test_reward_model_learns_and_scores_chats(tmp_path):
    """The launcher runs configs/rm.py (shortened) on the embedded pairs and held-out accuracy rises well above
    chance; load_reward_model then scores chats. One device in a subprocess: eight simulated devices on a busy
    2-core machine can stall XLA's collective rendezvous past its timeout."""
    overrides = {"steps": 80, "data.num_embedded": 2560, "optimizer.warmup_steps": 5, "optimizer.schedule": "constant",
                 "log_every": 40, "eval_every": 0, "checkpoint.async_save": False,
                 "data.pairs_per_row": 4, "data.trim_multiple": 128}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    command = [sys.executable, "-m", "alignment.launch", "--config=configs/rm.py", f"--workdir={tmp_path}",
               *[f"--config.{k}={v}" for k, v in overrides.items()]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "summary.json").read_text())["final_eval"]
    assert final["accuracy"] >= 0.65 and final["margin"] > 0, final  # chance: 0.5 +- 0.03 on 256 pairs
    score_fn = load_reward_model(str(tmp_path))
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    scores = score_fn([prompt + [{"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}],
                       prompt + [{"role": "assistant", "content": "3 + 4 = 7. The answer is 2."}]])
    assert scores.shape == (2,) and scores.dtype == np.float32
