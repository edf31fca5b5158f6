"""The train step skips NaN/Inf updates and counts them; the loop stops after K in a row."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignment.train.loop import BadStepCounter, TooManyBadSteps
from alignment.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from alignment.train.state import TrainState
from alignment.train.step import make_train_step

OPTIMIZER = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, schedule="constant", end_lr_factor=1.0, b1=0.9,
                                           b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))


def quadratic_loss(params, batch, rng):
    residual = params["w"] @ batch["x"] - batch["y"]
    return jnp.sum(residual ** 2), (jnp.asarray(batch["y"].size, jnp.float32), {})


def test_non_finite_step_is_skipped_and_counted():
    optimizer, schedule = make_optimizer(OPTIMIZER, 10)
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(quadratic_loss, optimizer, schedule))
    good = {"x": jnp.ones((4, 2)), "y": jnp.ones((3, 2))}
    bad = {"x": jnp.full((4, 2), jnp.nan), "y": jnp.ones((3, 2))}
    after_bad, metrics = step(state, bad)
    assert float(metrics["skipped"]) == 1.0
    np.testing.assert_array_equal(after_bad.params["w"], params["w"])
    for a, b in zip(jax.tree.leaves(after_bad.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(after_bad.step) == 1
    after_good, metrics = step(after_bad, good)
    assert float(metrics["skipped"]) == 0.0
    assert not np.allclose(after_good.params["w"], params["w"])


def test_bad_step_counter_stops_after_k_in_a_row():
    counter = BadStepCounter(limit=3)
    counter.update(np.array([0, 1, 1, 0, 1]), last_step=5)
    assert counter.total == 3 and counter.consecutive == 1
    with pytest.raises(TooManyBadSteps, match="3 consecutive steps up to step 7"):
        counter.update(np.array([1, 1]), last_step=7)


def test_schedule_and_decay_mask():
    schedule = learning_rate_schedule(1.0, total_steps=110, warmup_steps=10, decay="cosine", end_lr_factor=0.1)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)], [0.0, 0.5, 1.0, 0.1],
                               atol=1e-6)
    mask = decay_mask({"embed": 1, "layers": {"q_proj": 1, "attn_norm": 1, "q_bias": 1}, "final_norm": 1})
    assert mask == {"embed": True, "layers": {"q_proj": True, "attn_norm": False, "q_bias": False},
                    "final_norm": False}


def test_frozen_parameters_get_no_update_and_no_state():
    """A frozen top-level parameter (weight decay on) stays bit-exact; the others move as without freezing."""
    config = ml_collections.ConfigDict(dict(OPTIMIZER.to_dict(), weight_decay=0.1))
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
              "head": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "head": jnp.zeros((4, 5), jnp.float32)}
    plain, _ = make_optimizer(config, 10)
    frozen, _ = make_optimizer(config, 10, frozen=("head",))
    state = frozen.init(params)
    assert sum(x.size for x in jax.tree.leaves(state)) < sum(x.size for x in jax.tree.leaves(plain.init(params)))
    updates, _ = frozen.update(grads, state, params)
    expected, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_array_equal(updates["head"], np.zeros((4, 5)))
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    assert np.abs(np.asarray(expected["head"])).max() > 0  # weight decay would have moved the unused head
