"""The completion-window rows (left-padded prompts, head on completion tokens only) give the same per-token
log-probs as the whole right-padded rows, also with each prompt run once for its samples, and their shapes
take few values."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from alignment.algorithms.logprobs import target_hidden, token_logprobs
from alignment.data.rl_rows import completion_rows, rollout_rows
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs

RNG = np.random.default_rng(7)


def rollout(prompt_lengths, completion_lengths, max_new, vocab=50):
    prompts = [RNG.integers(3, vocab, n).tolist() for n in prompt_lengths]
    completions = RNG.integers(3, vocab, (len(completion_lengths), max_new)).astype(np.int32)
    return prompts, completions, np.asarray(completion_lengths, np.int32)


def tiny_model(seed):
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2))
    return model, nn.meta.unbox(model.init(jax.random.key(seed), *dummy_inputs())["params"])


def test_completion_rows_match_rollout_rows_log_probs():
    model, params = tiny_model(0)
    prompts, completions, lengths = rollout([5, 11, 2], [4, 9, 1, 12, 7, 3], max_new=12)
    logp = jax.jit(lambda b: token_logprobs(target_hidden(model, params, b), params["lm_head"], b["targets"]))

    full = rollout_rows(prompts, completions, lengths, 2, max_prompt=16, max_new=12)
    window = completion_rows(prompts, completions, lengths, 2, max_prompt=16, max_new=12, multiple=8)
    assert window["inputs"].shape == (6, 16 + 12 - 1) and window["targets"].shape == (6, 12)
    for row in range(6):  # the same completion tokens, in order
        np.testing.assert_array_equal(window["targets"][row][window["loss_mask"][row]],
                                      full["targets"][row][full["loss_mask"][row]])
    expected = np.asarray(logp(full))[full["loss_mask"]]
    np.testing.assert_allclose(np.asarray(logp(window))[window["loss_mask"]], expected, rtol=1e-5, atol=1e-5)


def test_shared_prompt_forward_matches_per_row_forward_and_gradient():
    """group > 1 runs each prompt once into a cache its samples attend to: same log-probs, same gradient."""
    model, params = tiny_model(1)
    prompts, completions, lengths = rollout([5, 11, 2], [4, 9, 1, 12, 7, 3], max_new=12)
    rows = completion_rows(prompts, completions, lengths, 2, max_prompt=16, max_new=12, multiple=8)
    mask = rows["loss_mask"]
    weights = RNG.standard_normal(mask.shape) * mask

    def loss(p, group):
        logp = token_logprobs(target_hidden(model, p, rows, group), p["lm_head"], rows["targets"])
        return (logp * weights).sum(), logp

    (_, expected), expected_grad = jax.value_and_grad(loss, has_aux=True)(params, 1)
    (_, shared), shared_grad = jax.value_and_grad(loss, has_aux=True)(params, 2)
    np.testing.assert_allclose(np.asarray(shared)[mask], np.asarray(expected)[mask], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(shared_grad), jax.tree.leaves(expected_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("prompt_lengths, completion_lengths, shapes", [
    ([5, 11], [4, 9], ((2, 16 + 16 - 1), (2, 16))),  # rounded up to the multiple
    ([17, 3], [1, 16], ((2, 24 + 16 - 1), (2, 16))),  # capped at max_prompt / max_new
])
def test_completion_rows_shapes_are_bucketed(prompt_lengths, completion_lengths, shapes):
    prompts, completions, lengths = rollout(prompt_lengths, completion_lengths, max_new=16)
    rows = completion_rows(prompts, completions, lengths, 1, max_prompt=24, max_new=16, multiple=16)
    assert (rows["inputs"].shape, rows["targets"].shape) == shapes
    assert rows["loss_mask"].sum() == lengths.sum()
    # Left padding: every prompt ends right before the completion window, positions start at 0.
    window = rows["inputs"].shape[1] - rows["targets"].shape[1]
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(rows["inputs"][row, window + 1 - len(prompt):window + 1], prompt)
        assert rows["positions"][row, window + 1 - len(prompt)] == 0


def test_completion_rows_refuse_a_prompt_over_the_limit():
    prompts, completions, lengths = rollout([30], [3], max_new=4)
    with pytest.raises(ValueError, match="max_prompt=24"):
        completion_rows(prompts, completions, lengths, 1, max_prompt=24, max_new=4)
