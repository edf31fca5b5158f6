"""Next-token sampling: temperature, top-k, top-p (nucleus), min-p and greedy, with per-row settings.

Settings are arrays with one value per row, so rows with different settings share one compiled program (the
server batches requests that way) and nothing recompiles when a setting changes. The order of the filters is
that of `transformers`: temperature, then top-k, then top-p over the top-k renormalised distribution, then
min-p. No step sorts the vocabulary (a [16, 32000] sort costs more than a decode step on CPU): top-k and top-p
thresholds are found by bisection on the logit value, and tokens are drawn by a two-level inverse CDF.
Values within (logit range) * 2**-BISECTION_STEPS of a threshold count as ties and are kept; that is
below the rounding noise of float32 logits.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BISECTION_STEPS = 24  # resolves thresholds to ~1e-6 of the logit range, the precision of fp32 logits
_CDF_BLOCK = 128  # vocabulary block of the two-level inverse CDF


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens. temperature 0 is greedy (argmax); the filters are off at their defaults."""

    temperature: float = 1.0  # logits are divided by this; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of most likely tokens with this much probability; 1 = off
    min_p: float = 0.0  # keep tokens with probability >= min_p * (top probability); 0 = off

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sampling: {message}")

    @property
    def truncated(self) -> bool:
        """True when samples come from a truncated distribution rather than softmax(logits / temperature)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)


def stack_params(rows: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row settings as arrays [rows], the form `sample` takes."""
    return {
        "temperature": np.asarray([r.temperature for r in rows], np.float32),
        "top_k": np.asarray([r.top_k for r in rows], np.int32),
        "top_p": np.asarray([r.top_p for r in rows], np.float32),
        "min_p": np.asarray([r.min_p for r in rows], np.float32),
    }


def _bisect_threshold(scaled: jax.Array, lo: jax.Array, hi: jax.Array, enough) -> jax.Array:
    """Largest t in [lo, hi] per row with enough(scaled >= t) true, by bisection; enough(mask [rows, V]) -> [rows].

    `enough` must be true at lo and monotone (true for every t below a true one).
    """
    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = enough(scaled >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, BISECTION_STEPS, step, (lo, hi))[0]


def keep_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """bool [rows, V]: tokens the filters keep. scaled [rows, V] are temperature-scaled logits; settings [rows].

    Each bisection runs only when some row of the batch uses its filter; rows with a filter off keep everything.
    """
    lo, hi = jnp.min(scaled, axis=-1), jnp.max(scaled, axis=-1)
    k = jnp.where(top_k > 0, top_k, scaled.shape[-1])
    k_threshold = jax.lax.cond(
        jnp.any(top_k > 0),
        lambda: _bisect_threshold(scaled, lo, hi, lambda keep: jnp.sum(keep, axis=-1) >= k),
        lambda: lo)
    weights = jnp.where(scaled >= k_threshold[:, None], jnp.exp(scaled - hi[:, None]), 0.0)
    target = top_p * jnp.sum(weights, axis=-1)
    p_threshold = jax.lax.cond(
        jnp.any(top_p < 1),
        lambda: _bisect_threshold(scaled, k_threshold, hi,
                                  lambda keep: jnp.sum(jnp.where(keep, weights, 0.0), axis=-1) >= target),
        lambda: k_threshold)
    # Rows without top-p skip it exactly (float32 mass sums cannot see the dropping of a 1e-8 token).
    p_threshold = jnp.where(top_p < 1, p_threshold, k_threshold)
    # p_i >= min_p * p_max  <=>  scaled_i - scaled_max >= log(min_p); min_p = 0 gives -inf and keeps all.
    threshold = jnp.maximum(p_threshold, hi + jnp.log(min_p))
    return scaled >= threshold[:, None]


def first_index(cond: jax.Array) -> jax.Array:
    """[rows] index of the first True along the last axis (size of the axis when none); cheaper than argmax on CPU."""
    n = cond.shape[-1]
    return jnp.min(jnp.where(cond, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
    """[rows] argmax of logits [rows, V], lowest index on ties."""
    return first_index(logits == jnp.max(logits, axis=-1, keepdims=True))


def _last_positive(weights: jax.Array) -> jax.Array:
    n = weights.shape[-1]
    return n - 1 - first_index(jnp.flip(weights > 0, axis=-1))


def _pick(weights: jax.Array, target: jax.Array) -> jax.Array:
    """[rows] first index whose running sum of weights [rows, n] exceeds target [rows]; a weight > 0 always."""
    cumulative = jnp.cumsum(weights, axis=-1)
    index = jnp.sum(cumulative <= target[:, None], axis=-1).astype(jnp.int32)
    # target rounded up to the total: take the last token with weight instead of running off the end.
    return jnp.where(index < weights.shape[-1], index, _last_positive(weights))


def inverse_cdf(uniform: jax.Array, weights: jax.Array) -> jax.Array:
    """[rows] draws from unnormalised weights [rows, V] >= 0 given uniform [rows] in [0, 1).

    Two levels (a block, then a token inside it), so no pass over the vocabulary is a long cumulative sum.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // _CDF_BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - vocab))).reshape(rows, blocks, _CDF_BLOCK)
    block_mass = jnp.sum(padded, axis=-1)
    target = uniform * jnp.sum(block_mass, axis=-1)
    block = _pick(block_mass, target)
    before = jnp.sum(jnp.where(jnp.arange(blocks) < block[:, None], block_mass, 0.0), axis=-1)
    inside = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]
    return block * _CDF_BLOCK + _pick(inside, target - before)


def sample(keys: jax.Array, logits: jax.Array, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One token per row. keys [rows] (typed PRNG keys), logits [rows, V] float32, params from `stack_params`.

    Returns tokens [rows] int32; logprobs [rows], log softmax(logits / T) of the token (T = 1 for greedy
    rows), the distribution a trainer recomputes; sampling_logprobs [rows], the log-probability under the
    truncated distribution actually sampled from (equal to logprobs when no filter is on).
    """
    temperature = params["temperature"]
    is_greedy = temperature <= 0
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    picked = greedy(scaled)

    def draw():
        """(tokens, log-probabilities under the sampled truncated distribution) of the sampling rows."""
        keep = keep_mask(scaled, params["top_k"], params["top_p"], params["min_p"]) | is_greedy[:, None]
        weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
        tokens = jnp.where(is_greedy, picked, inverse_cdf(uniform, weights))
        chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
        sampling_logprobs = chosen - jax.nn.logsumexp(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        return tokens, jnp.where(is_greedy, 0.0, sampling_logprobs)  # greedy picks with certainty

    # A batch of greedy rows only (evaluation, greedy serving) skips the filters and the draw.
    tokens, sampling_logprobs = jax.lax.cond(jnp.all(is_greedy), lambda: (picked, jnp.zeros_like(temperature)), draw)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(scaled, axis=-1)
    return {"tokens": tokens, "logprobs": logprobs, "sampling_logprobs": sampling_logprobs}
