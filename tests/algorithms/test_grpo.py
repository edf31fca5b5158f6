"""GRPO pieces against float64 numpy references of their published formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms import grpo

RNG = np.random.default_rng(0)


def numpy_advantages(rewards, scale, estimator, eps=1e-6):
    out = np.zeros_like(rewards)
    for p, group in enumerate(rewards):
        for i, r in enumerate(group):
            baseline = group.mean() if estimator == "grpo" else np.delete(group, i).mean()
            out[p, i] = r - baseline
        if scale == "group":
            out[p] /= group.std() + eps
    if scale == "batch":
        out /= rewards.std() + eps
    return out


@pytest.mark.parametrize("scale", grpo.ADVANTAGE_SCALES)
@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_group_advantages(scale, estimator):
    rewards = RNG.random((5, 4))
    rewards[2] = 0.7  # zero-variance group: no signal
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), scale, estimator), np.float64)
    np.testing.assert_allclose(got, numpy_advantages(rewards, scale, estimator), rtol=1e-4, atol=1e-5)
    assert np.all(got[2] == 0)


def test_token_advantages_are_reward_to_go():
    kl = RNG.random((3, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], bool)
    seq_adv, beta = RNG.standard_normal(3), 0.3
    expected = np.zeros_like(kl)
    for r in range(3):
        tokens = np.flatnonzero(mask[r])
        rewards = {t: -beta * kl[r, t] for t in tokens}
        rewards[tokens[-1]] += seq_adv[r]
        for t in tokens:
            expected[r, t] = sum(rewards[u] for u in tokens if u >= t)
    got = grpo.token_advantages(jnp.asarray(seq_adv, jnp.float32), jnp.asarray(kl, jnp.float32), mask, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_clipped_surrogate_and_aggregations():
    logp, old = RNG.normal(-2, 0.3, (4, 5)), RNG.normal(-2, 0.3, (4, 5))
    adv = RNG.standard_normal((4, 5))
    mask = RNG.random((4, 5)) < 0.8
    mask[3] = False  # an empty row counts as no sequence
    ratio = np.exp(logp - old)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv)
    got, _ = grpo.clipped_surrogate(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), 0.2, 0.28)
    np.testing.assert_allclose(got, per_token, rtol=1e-5, atol=1e-6)
    rows = [r for r in range(4) if mask[r].any()]
    expected = {
        "token_mean": per_token[mask].mean(),
        "seq_mean_token_mean": np.mean([per_token[r][mask[r]].mean() for r in rows]),
        "constant": per_token[mask].sum() / (len(rows) * 7),
    }
    for name, value in expected.items():
        total, count = grpo.aggregate(jnp.asarray(per_token), jnp.asarray(mask), name, max_tokens=7)
        np.testing.assert_allclose(total / count, value, rtol=1e-5)


def test_k3_is_nonnegative_and_zero_at_equality():
    logp, ref = RNG.normal(-2, 1, 50), RNG.normal(-2, 1, 50)
    got = np.asarray(grpo.k3(jnp.asarray(logp), jnp.asarray(ref)))
    np.testing.assert_allclose(got, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-7)
    assert got.min() >= 0 and float(grpo.k3(jnp.asarray(1.0), jnp.asarray(1.0))) == 0


def test_reference_topk_with_k_equal_vocab_is_full_softmax():
    hidden = jnp.asarray(RNG.standard_normal((2, 5, 8)), jnp.float32)
    unembedding = jnp.asarray(RNG.standard_normal((8, 11)), jnp.float32)
    ids, logprobs = grpo.reference_topk(hidden, unembedding, k=11, temperature=0.7, chunk=3)
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64) / 0.7
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, np.take_along_axis(full, np.asarray(ids), -1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(logprobs), axis=-1) <= 0)


def test_topk_kl_is_nonnegative_and_equals_full_kl_when_k_is_vocab():
    from alignment.algorithms.logprobs import logprobs_entropy_kl

    hidden = jnp.asarray(RNG.standard_normal((2, 4, 8)), jnp.float32)
    w_policy = jnp.asarray(RNG.standard_normal((8, 13)), jnp.float32)
    w_ref = jnp.asarray(RNG.standard_normal((8, 13)), jnp.float32)
    targets = jnp.asarray(RNG.integers(0, 13, (2, 4)))
    ids, ref_lp = grpo.reference_topk(hidden, w_ref, k=13)
    kl = logprobs_entropy_kl(hidden, w_policy, targets, ref_topk_ids=ids, ref_topk_logprobs=ref_lp).kl
    p = jax.nn.log_softmax(np.asarray(hidden, np.float64) @ np.asarray(w_policy, np.float64))
    q = jax.nn.log_softmax(np.asarray(hidden, np.float64) @ np.asarray(w_ref, np.float64))
    full = np.sum(np.exp(p) * (p - q), axis=-1)
    np.testing.assert_allclose(kl, full, rtol=1e-4, atol=1e-5)
    ids, ref_lp = grpo.reference_topk(hidden, w_ref, k=4)
    partial = logprobs_entropy_kl(hidden, w_policy, targets, ref_topk_ids=ids, ref_topk_logprobs=ref_lp).kl
    assert float(jnp.min(partial)) >= 0


def test_first_pass_ratio_is_exactly_one():
    from alignment.models import ModelConfig, Transformer
    from alignment.models.transformer import dummy_inputs
    import flax.linen as nn

    config = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=1)
    model = Transformer(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs())["params"])
    rows, width = 4, 10
    batch = {
        "inputs": jnp.asarray(RNG.integers(0, 40, (rows, width))), "targets": jnp.asarray(RNG.integers(0, 40, (rows, width))),
        "positions": jnp.tile(jnp.arange(width), (rows, 1)), "segment_ids": jnp.ones((rows, width), jnp.int32),
        "loss_mask": jnp.asarray(RNG.random((rows, width)) < 0.7), "advantages": jnp.asarray(RNG.standard_normal((rows, width))),
        "old_logp": jnp.full((rows, width), -3.0), "ref_logp": jnp.full((rows, width), -3.0),
        "first_pass": jnp.ones((rows,)),
    }
    loss = jax.jit(lambda p, b: grpo.grpo_loss(model, p, b, None, temperature=0.9, clip_low=0.2, clip_high=0.2,
                                               kl_mode="k3", beta=0.1, aggregation="token_mean", max_tokens=width))
    _, (count, metrics) = loss(params, batch)
    assert float(metrics["ratio_sum"]) == float(metrics["tokens"]) == float(count)
    assert float(metrics["clip_fraction_sum"]) == 0


def test_kl_penalty_is_k3_times_the_importance_ratio():
    logp, ref, old = RNG.normal(-2, 1, (3, 7)), RNG.normal(-2, 1, (3, 7)), RNG.normal(-2, 1, (3, 7))
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    as_jax = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]
    np.testing.assert_allclose(grpo.kl_penalty(*as_jax(logp, ref)), k3, rtol=1e-5, atol=1e-7)
    ratio = grpo.importance_ratio("ppo_clip", *as_jax(logp, old), jnp.ones((3, 7)))
    np.testing.assert_allclose(grpo.kl_penalty(*as_jax(logp, ref), ratio), k3 * np.exp(logp - old), rtol=1e-5,
                               atol=1e-7)
    sequence = grpo.importance_ratio("gspo", *as_jax(logp, old), jnp.ones((3, 7)))  # GSPO: one ratio per sequence
    np.testing.assert_allclose(sequence[:, 0], np.exp(np.mean(logp - old, axis=1)), rtol=1e-5)
    assert grpo.kl_form(False) == "k3" and grpo.kl_form(True) == "k3_ratio"


def test_importance_ratio_needs_the_k3_mode():
    with pytest.raises(ValueError, match="kl_importance_ratio .* needs kl_mode 'k3', got 'token_reward'"):
        grpo.grpo_loss(None, None, {}, None, temperature=1.0, clip_low=0.2, clip_high=0.2, kl_mode="token_reward",
                       beta=0.1, aggregation="token_mean", max_tokens=4, kl_importance_ratio=True)


def numpy_policy_loss(name, logp, old, adv, mask, low, high):
    """(per-token loss, its gradient w.r.t. logp) of the published formulas, in float64, row by row."""
    loss, grad = np.zeros_like(logp), np.zeros_like(logp)
    for r in range(logp.shape[0]):
        real = mask[r]
        if name == "gspo":  # one ratio per sequence: s = exp(mean of the log-ratios)
            s = np.exp(np.mean(logp[r, real] - old[r, real]))
            for t in np.flatnonzero(real):
                unclipped, clipped = s * adv[r, t], np.clip(s, 1 - low, 1 + high) * adv[r, t]
                loss[r, t] = -min(unclipped, clipped)
                if unclipped <= clipped:  # the unclipped branch is the min: d(-s A)/d logp_u = -s A / n
                    grad[r, real] += -s * adv[r, t] / real.sum()
        else:  # cispo: -sg(min(ratio, 1 + high)) A logp
            w = np.minimum(np.exp(logp[r] - old[r]), 1 + high)
            loss[r], grad[r] = -w * adv[r] * logp[r], -w * adv[r]
    return loss, grad * mask


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_policy_losses_match_their_formulas(name):
    rng = np.random.default_rng(11)  # its own draws, so the clip binds on some tokens whatever ran before
    logp = rng.normal(-2, 0.3, (6, 8))
    old = logp + rng.normal(0, 0.3 if name == "cispo" else 0.08, logp.shape)
    adv = np.repeat(rng.standard_normal((6, 1)), 8, axis=1)
    mask = rng.random((6, 8)) < 0.8
    mask[:, 0] = True
    low, high = (0.01, 0.015) if name == "gspo" else (0.2, 0.28)
    expected, expected_grad = numpy_policy_loss(name, logp, old, adv, mask, low, high)
    with jax.enable_x64(True):
        def total(lp):
            per_token, _ = grpo.policy_loss(name, lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), low, high)
            return jnp.sum(per_token * mask), per_token

        (_, per_token), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(logp))
        np.testing.assert_allclose(np.asarray(per_token)[mask], expected[mask], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-12, atol=1e-15)
    _, clipped = grpo.policy_loss(name, jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                  low, high)
    assert 0 < float(np.asarray(clipped)[mask].mean()) < 1  # the clip binds on some tokens, not all


def test_ppo_clip_by_name_is_the_clipped_surrogate_and_unknown_names_are_refused():
    logp, old, adv = (jnp.asarray(RNG.normal(-2, 0.3, (3, 4))) for _ in range(3))
    got = grpo.policy_loss("ppo_clip", logp, old, adv, jnp.ones((3, 4)), 0.2, 0.28)
    want = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="policy loss must be one of .* got 'gpso'"):
        grpo.policy_loss("gpso", logp, old, adv, jnp.ones((3, 4)), 0.2, 0.28)


@pytest.mark.parametrize("policy", grpo.POLICY_LOSSES)
def test_first_pass_ratio_is_one_for_every_policy_loss(policy):
    """On pi_old's own log-probs every loss is -A logp's gradient: the ratio (token or sequence) is exactly 1."""
    logp = jnp.asarray(RNG.normal(-2, 0.3, (3, 5)))
    adv, mask = jnp.asarray(RNG.standard_normal((3, 5))), jnp.ones((3, 5))
    grad = jax.grad(lambda lp: jnp.sum(grpo.policy_loss(policy, lp, jax.lax.stop_gradient(lp), adv, mask, 0.2,
                                                        0.28)[0]))(logp)
    if policy == "gspo":  # a sequence's tokens share the mean of its advantages
        expected = -np.repeat(np.asarray(adv).mean(axis=1, keepdims=True), 5, axis=1)
    else:
        expected = -np.asarray(adv)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)
