"""The rollout engine against recomputation without a cache, on the tiny model and the 8-device test mesh."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment import sharding
from alignment.algorithms.logprobs import token_logprobs
from alignment.config import model_preset
from alignment.generation.engine import Engine, bucket
from alignment.generation.sampling import SamplingParams
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs

NEW = 12  # new tokens; buckets to 16 like the 16-slot prompt bucket, so most tests share one compile
PROMPT_LENGTHS = (5, 11, 3)
REFERENCE_SHAPE = (16, 32)  # the uncached reference pads its batch to this shape: one compile


@pytest.fixture(scope="module")
def setup():
    # A wider init than the default makes next-token distributions peaked, so greedy choices are clear-cut.
    config = ModelConfig.from_dict({**model_preset("tiny").to_dict(), "initializer_range": 0.1})
    model = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"]))(jax.random.key(0))
    # One device keeps compiles fast; test_tensor_parallel_mesh_gives_the_same_tokens covers the 8-device mesh.
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    engine = Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return model, params, engine, prompts


_FORWARDS = {}


def _forward_logits(model, params, tokens, lengths):
    """Uncached forward of right-padded rows tokens [b, len] -> (hidden, logits [b, len, vocab])."""
    if model not in _FORWARDS:
        def forward(params, tokens, lengths):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
            hidden = model.apply({"params": params}, tokens, positions, segment_ids)
            return hidden, model.apply({"params": params}, hidden, method=Transformer.logits)
        _FORWARDS[model] = jax.jit(forward)
    return _FORWARDS[model](params, tokens, lengths)


def _padded(rows):
    tokens, lengths = np.zeros(REFERENCE_SHAPE, np.int32), np.zeros(REFERENCE_SHAPE[:1], np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], lengths[i] = r, len(r)
    return tokens, lengths


def _greedy_by_recomputation(model, params, prompts, steps):
    """Greedy continuation re-running the whole sequence for every token, no cache."""
    rows = [list(p) for p in prompts]
    for _ in range(steps):
        tokens, lengths = _padded(rows)
        _, logits = _forward_logits(model, params, tokens, lengths)
        logits = np.asarray(logits)
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    return [r[len(p):] for r, p in zip(rows, prompts)]


def _teacher_forced_logprobs(model, params, prompts, completions, temperature):
    """log softmax(logits / T) of each completion token from one uncached forward over prompt + completion."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    tokens, lengths = _padded(rows)
    hidden, _ = _forward_logits(model, params, tokens, lengths)
    targets = np.roll(tokens, -1, axis=1)
    unembedding = params["lm_head"]
    lp = np.asarray(token_logprobs(hidden, unembedding, jnp.asarray(targets), temperature))
    return [lp[i, len(p) - 1: len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(prompts, completions))]


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    assert bucket(3, 1) == 4


def test_greedy_with_cache_equals_recomputation(setup):
    model, params, engine, prompts = setup
    out = engine.generate(prompts, NEW)
    assert out.lengths.tolist() == [NEW] * len(prompts) and not out.stopped.any()
    expected = _greedy_by_recomputation(model, params, prompts, NEW)
    assert [out.row(i) for i in range(len(prompts))] == expected
    # Greedy log-probs are reported at temperature 1.
    reference = _teacher_forced_logprobs(model, params, prompts, expected, 1.0)
    for i in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=1e-5)


def test_bfloat16_compute_with_cache_equals_recomputation(setup):
    """bf16 compute over float32 parameters (how the RL stages run in bf16); the cache holds bf16 values."""
    model, params, _, prompts = setup
    config = dataclasses.replace(model.config, dtype="bfloat16")
    model = Transformer(config)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    out = Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0).generate(prompts, NEW)
    completions = [out.row(i) for i in range(len(prompts))]
    # Rounding differs between the cached and the full forward, so near-ties may break either way: every greedy
    # token must be the argmax of the uncached forward up to bf16 error, and its log-prob must match.
    tokens, lengths = _padded([p + c for p, c in zip(prompts, completions)])
    logits = np.asarray(_forward_logits(model, params, tokens, lengths)[1])
    reference = _teacher_forced_logprobs(model, params, prompts, completions, 1.0)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        rows = logits[i, len(p) - 1: len(p) - 1 + len(c)]
        assert np.all(rows[np.arange(len(c)), c] >= rows.max(axis=-1) - 0.05)
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=3e-2)


def test_sampled_logprobs_equal_teacher_forced_forward(setup):
    model, params, engine, prompts = setup
    out = engine.generate(prompts, NEW, SamplingParams(temperature=0.7), seeds=3)
    assert not out.truncated
    completions = [out.row(i) for i in range(len(prompts))]
    reference = _teacher_forced_logprobs(model, params, prompts, completions, 0.7)
    for i in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=1e-5)
        np.testing.assert_allclose(out.sampling_logprobs[i], reference[i], atol=1e-5)


def test_truncated_sampling_is_flagged_and_logprobs_stay_on_the_full_distribution(setup):
    model, params, engine, prompts = setup
    out = engine.generate(prompts, NEW, SamplingParams(temperature=1.0, top_p=0.8, top_k=20), seeds=5)
    assert out.truncated
    completions = [out.row(i) for i in range(len(prompts))]
    reference = _teacher_forced_logprobs(model, params, prompts, completions, 1.0)
    for i in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=1e-5)
        # Renormalising over the kept tokens can only raise a token's probability.
        assert (out.sampling_logprobs[i] >= out.logprobs[i] - 1e-6).all()


def test_group_samples_share_one_prefill(setup):
    model, params, engine, prompts = setup
    group = 3
    greedy = engine.generate(prompts, NEW, num_samples=group)
    single = engine.generate(prompts, NEW)
    for i in range(len(prompts)):
        for g in range(group):
            assert greedy.row(i * group + g) == single.row(i)
    sampled = engine.generate(prompts, NEW, SamplingParams(temperature=1.0), num_samples=group, seeds=11)
    rows = [sampled.row(r) for r in range(len(prompts) * group)]
    assert len({tuple(r) for r in rows}) == len(rows), "samples of one prompt must be independent draws"
    # Every row, continued from the shared cache, is scored exactly as its own uncached forward scores it.
    reference = _teacher_forced_logprobs(model, params, [p for p in prompts for _ in range(group)], rows, 1.0)
    for r in range(len(rows)):
        np.testing.assert_allclose(sampled.logprobs[r], reference[r], atol=1e-5)
    # A row depends only on (prompt, seed, sample index), not on its place in the batch.
    again = engine.generate(prompts[::-1], NEW, SamplingParams(temperature=1.0), num_samples=group,
                            seeds=[13, 12, 11])
    assert [again.row(r) for r in range(len(rows))] == [
        rows[i * group + g] for i in reversed(range(len(prompts))) for g in range(group)]


def test_params_passed_per_call_replace_the_engines(setup):
    model, params, engine, prompts = setup
    updated = jax.tree.map(lambda p: p * 1.5, params)  # e.g. a trainer's weights after an update
    out = engine.generate(prompts, NEW, params=updated)
    assert [out.row(i) for i in range(len(prompts))] == _greedy_by_recomputation(model, updated, prompts, NEW)


def test_stop_ids_end_rows_early_and_per_row_limits(setup):
    _, _, engine, prompts = setup
    free = engine.generate(prompts, NEW)
    stop = free.row(0)[4]
    out = engine.generate(prompts, [NEW, 6, NEW], stop_ids=[stop])
    for i in range(len(prompts)):
        full, limit = free.row(i), [NEW, 6, NEW][i]
        end = full.index(stop) + 1 if stop in full[:limit] else limit
        assert out.row(i) == full[:end]
        assert bool(out.stopped[i]) == (stop in full[:limit])
        assert (out.tokens[i, end:] == engine.pad_id).all() and (out.logprobs[i, end:] == 0).all()
    assert out.lengths[0] <= 5 and out.stopped[0]


def test_tensor_parallel_mesh_gives_the_same_tokens(setup):
    model, params, engine, prompts = setup
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    abstract = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    placed = jax.device_put(params, sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES))
    tp = Engine(model.config, placed, mesh, sharding.DEFAULT_RULES, pad_id=0)
    out, reference = tp.generate(prompts, NEW), engine.generate(prompts, NEW)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_allclose(out.logprobs, reference.logprobs, atol=1e-5)


def test_bad_requests_are_refused_with_the_prompt_named(setup):
    _, _, engine, prompts = setup
    too_long = [1] * (engine.max_len - 4)
    with pytest.raises(ValueError, match="prompt 1: .*exceeds the context length"):
        engine.generate([prompts[0], too_long], 8)
    with pytest.raises(ValueError, match="prompt 0: prompt is empty"):
        engine.generate([[]], 8)
    with pytest.raises(ValueError, match="max_new_tokens: 2 values for 3 prompts"):
        engine.generate(prompts, [4, 4])
