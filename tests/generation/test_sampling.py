"""Sampling filters against a float64 numpy reference: exact support, chi-square fit, reported log-probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.generation import sampling
from alignment.generation.sampling import SamplingParams

NUM_DRAWS = 10000


def reference_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """float64 [V] target distribution, by sorting (the textbook definitions, applied as transformers does)."""
    s = logits.astype(np.float64) / p.temperature
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    order = np.argsort(-s, kind="stable")
    keep = np.zeros(len(s), bool)
    keep[order[: p.top_k or len(s)]] = True
    q = np.where(keep, probs, 0.0)
    q /= q.sum()
    mass_before = np.cumsum(q[order]) - q[order]
    nucleus = np.zeros(len(s), bool)
    nucleus[order[mass_before < p.top_p]] = True
    keep &= nucleus & (probs >= p.min_p * probs.max())
    target = np.where(keep, probs, 0.0)
    return target / target.sum()


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile (z = 3.719: p = 1e-4) by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=1.4, top_k=40, top_p=0.9, min_p=0.02),
]


@jax.jit
def _draw(seed, logits, settings):
    keys = jax.random.split(jax.random.key(seed), logits.shape[0])
    return sampling.sample(keys, logits, settings)


@pytest.mark.parametrize("vocab", [12, 300])  # 300: several blocks of the two-level inverse CDF, one partial
def test_samples_follow_the_target_distribution(vocab):
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(size=vocab) * 2.0).astype(np.float32)
    # All cases in one batch: rows with different settings share one program.
    rows = [case for case in CASES for _ in range(NUM_DRAWS)]
    out = jax.device_get(_draw(vocab, jnp.broadcast_to(logits, (len(rows), vocab)), sampling.stack_params(rows)))
    for i, case in enumerate(CASES):
        tokens = out["tokens"][i * NUM_DRAWS:(i + 1) * NUM_DRAWS]
        target = reference_distribution(logits, case)
        counts = np.bincount(tokens, minlength=vocab)
        assert counts[target == 0].sum() == 0, f"{case}: tokens outside the support were drawn"
        expected = target * NUM_DRAWS
        big = expected >= 5  # pool small bins so the chi-square approximation holds
        observed = np.append(counts[big], counts[~big & (target > 0)].sum())
        wanted = np.append(expected[big], expected[~big & (target > 0)].sum())
        observed, wanted = observed[wanted > 0], wanted[wanted > 0]
        statistic = float(np.sum((observed - wanted) ** 2 / wanted))
        assert statistic < chi_square_critical(len(wanted) - 1), f"{case}: chi-square {statistic:.1f}"
        # Reported log-probs: the full tempered softmax, and the truncated distribution actually sampled.
        s = logits.astype(np.float64) / case.temperature
        full = s - np.log(np.sum(np.exp(s)))
        np.testing.assert_allclose(out["logprobs"][i * NUM_DRAWS:][:50], full[tokens[:50]], atol=1e-5)
        np.testing.assert_allclose(out["sampling_logprobs"][i * NUM_DRAWS:][:50], np.log(target[tokens[:50]]),
                                   atol=1e-5)


def test_greedy_rows_take_the_argmax_and_report_tempered_one_logprobs():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    rows = [SamplingParams(temperature=0.0, top_k=3)] * 3 + [SamplingParams(temperature=0.5)] * 61
    out = jax.device_get(_draw(0, jnp.asarray(logits), sampling.stack_params(rows)))
    np.testing.assert_array_equal(out["tokens"][:3], logits[:3].argmax(-1))
    full = logits[:3] - np.log(np.exp(logits[:3].astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(out["logprobs"][:3], full[np.arange(3), out["tokens"][:3]], atol=1e-5)
    np.testing.assert_array_equal(out["sampling_logprobs"][:3], 0.0)


def test_same_seed_same_draws_and_different_seed_different_draws():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(64, 50)), jnp.float32)
    settings = sampling.stack_params([SamplingParams(temperature=1.0, top_p=0.95)] * 64)
    a, b, c = (jax.device_get(_draw(s, logits, settings)["tokens"]) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(min_p=1.5), "min_p"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_truncated_flag():
    assert not SamplingParams(temperature=0.7).truncated
    assert not SamplingParams(temperature=0.0, top_p=0.5).truncated  # greedy ignores filters
    assert SamplingParams(top_k=10).truncated and SamplingParams(top_p=0.9).truncated
    assert SamplingParams(min_p=0.1).truncated
