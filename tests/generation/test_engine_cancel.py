"""The engine's server-facing options: decoding in chunks with a cancellation check between them, and padding
the samples per prompt to a bucket. Both must leave every kept row exactly as a plain call computes it."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from alignment import sharding
from alignment.config import model_preset
from alignment.generation.engine import Cancelled, Engine
from alignment.generation.sampling import SamplingParams
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs

NEW = 12  # new tokens (a 16-token bucket)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def setup():
    config = ModelConfig.from_dict(model_preset("tiny").to_dict())
    model = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"]))(jax.random.key(0))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    engine = Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 9)]
    return engine, prompts


def assert_same(a, b):
    for field in ("tokens", "lengths", "logprobs", "sampling_logprobs", "stopped"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_chunked_decoding_equals_one_call(setup):
    engine, prompts = setup
    whole = engine.generate(prompts, [NEW, 7], SAMPLED, num_samples=2, seeds=3)
    # A stop id that the unstopped run draws ends that row early: chunks must carry `done` across the boundary.
    stop = int(whole.tokens[0, 4])
    whole_stopped = engine.generate(prompts, [NEW, 7], SAMPLED, num_samples=2, seeds=3, stop_ids=[stop])
    for every in (1, 3, 16):
        checks = []

        def never():
            checks.append(1)
            return False

        chunked = engine.generate(prompts, [NEW, 7], SAMPLED, num_samples=2, seeds=3, cancelled=never,
                                  check_every=every)
        assert_same(chunked, whole)
        # Asked before the prefill and before each chunk: 1 + ceil((16 - 1) / every) times at most.
        assert 2 <= len(checks) <= 1 + -(-15 // every)
        assert_same(engine.generate(prompts, [NEW, 7], SAMPLED, num_samples=2, seeds=3, stop_ids=[stop],
                                    cancelled=lambda: False, check_every=every), whole_stopped)


@pytest.mark.parametrize("answers, steps", [([True], 0), ([False, True], 1), ([False, False, False, True], 9)])
def test_cancelled_stops_at_the_next_chunk_boundary(setup, answers, steps):
    engine, prompts = setup
    answers = iter(answers)
    with pytest.raises(Cancelled) as stopped:
        engine.generate(prompts, NEW, SAMPLED, seeds=1, cancelled=lambda: next(answers), check_every=4)
    assert stopped.value.steps == steps  # before the prefill, after it (1 token), then every 4 steps
    # Nothing of the abandoned call lingers: the next one is complete and as a plain call computes it.
    assert_same(engine.generate(prompts, NEW, SAMPLED, seeds=1, cancelled=lambda: False),
                engine.generate(prompts, NEW, SAMPLED, seeds=1))


def test_padded_samples_keep_the_real_rows_and_share_a_program(setup):
    engine, prompts = setup
    for num_samples in (3, 4):
        plain = engine.generate(prompts, NEW, SAMPLED, num_samples=num_samples, seeds=5)
        padded = engine.generate(prompts, NEW, SAMPLED, num_samples=num_samples, seeds=5, pad_samples_to=4)
        assert_same(padded, plain)
        assert padded.num_samples == num_samples and padded.tokens.shape[0] == len(prompts) * num_samples
    programs = engine._prefill._cache_size(), engine._decode._cache_size()
    engine.generate(prompts, NEW, SAMPLED, num_samples=3, seeds=8, pad_samples_to=4)
    assert (engine._prefill._cache_size(), engine._decode._cache_size()) == programs
    with pytest.raises(ValueError, match="pad_samples_to=2 is below num_samples=3"):
        engine.generate(prompts, NEW, num_samples=3, pad_samples_to=2)
