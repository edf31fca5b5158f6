"""The rollout engine against recomputation without a cache, on the tiny model: greedy tokens, log-probs equal to
a teacher-forced pass (also for sequences that joined the batch at different steps), prefix sharing, stop
tokens and strings, per-request settings in one batch, preemption, cancellation, and the 8-device mesh."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment import sharding
from alignment.algorithms.logprobs import token_logprobs
from alignment.config import model_preset
from alignment.data.tokenizer import load_tokenizer
from alignment.generation.engine import Cancelled, Engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish
from alignment.models import ModelConfig, Transformer, lora
from alignment.models.transformer import dummy_inputs
from alignment_kernels.cpu_decode import api as cpu_decode

NEW = 12
PROMPT_LENGTHS = (5, 11, 3, 20, 7)
REFERENCE_SHAPE = (16, 64)  # the uncached reference pads its batch to this shape: one compile
SLOTS = 2  # fewer slots than prompts: sequences join the batch as others finish


@pytest.fixture(scope="module")
def setup():
    # A wider init than the default makes next-token distributions peaked, so greedy choices are clear-cut.
    config = ModelConfig.from_dict({**model_preset("tiny").to_dict(), "initializer_range": 0.1})
    model = Transformer(config)
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"]))(jax.random.key(0))
    tokenizer = load_tokenizer("embedded")
    # One device keeps compiles fast; test_sharded_mesh_gives_the_same_tokens covers the 8-device mesh.
    engine = make_engine(config, params, detokenize=lambda ids: tokenizer.decode(ids, skip_special=True))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return model, params, engine, prompts, tokenizer


def make_engine(config, params, mesh=None, **options):
    mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0, **{"slots": SLOTS, "page_size": 8,
                                                                            "steps_per_call": 4, **options})


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
        logits = np.asarray(_forward_logits(model, params, tokens, lengths)[1])
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    return [r[len(p):] for r, p in zip(rows, prompts)]


def _teacher_forced_logprobs(model, params, prompts, completions, temperature):
    """log softmax(logits / T) of each completion token from one uncached forward over prompt + completion,
    through the trainer's own log-prob function."""
    out = []
    for start in range(0, len(prompts), REFERENCE_SHAPE[0]):
        ps, cs = prompts[start:start + REFERENCE_SHAPE[0]], completions[start:start + REFERENCE_SHAPE[0]]
        tokens, lengths = _padded([list(p) + list(c) for p, c in zip(ps, cs)])
        hidden, _ = _forward_logits(model, params, tokens, lengths)
        targets = np.roll(tokens, -1, axis=1)
        lp = np.asarray(token_logprobs(hidden, params["lm_head"], jnp.asarray(targets), temperature))
        out += [lp[i, len(p) - 1: len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(ps, cs))]
    return out


def rows(out):
    return [out.row(i) for i in range(len(out.lengths))]


def test_greedy_with_cache_equals_recomputation(setup):
    model, params, engine, prompts, _ = setup
    out = engine.generate(prompts, NEW)
    assert out.lengths.tolist() == [NEW] * len(prompts) and not out.stopped.any()
    expected = _greedy_by_recomputation(model, params, prompts, NEW)
    assert rows(out) == expected
    reference = _teacher_forced_logprobs(model, params, prompts, expected, 1.0)  # greedy: reported at T = 1
    for i in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=1e-5)


def test_logprobs_equal_a_teacher_forced_pass_when_rows_join_at_different_steps(setup):
    """Two slots, five prompts with budgets 3 to 12: each later prompt joins when one before it finishes, at a
    different step, beside a sequence that is mid-way; every log-prob is still the trainer's, to 1e-5."""
    model, params, engine, prompts, _ = setup
    budgets = [3, 12, 5, 9, 12]
    out = engine.generate(prompts, budgets, SamplingParams(temperature=0.7), seeds=3)
    assert out.lengths.tolist() == budgets and not out.truncated
    completions = rows(out)
    reference = _teacher_forced_logprobs(model, params, prompts, completions, 0.7)
    for i, budget in enumerate(budgets):
        np.testing.assert_allclose(out.logprobs[i, :budget], reference[i], atol=1e-5)
        np.testing.assert_allclose(out.sampling_logprobs[i, :budget], reference[i], atol=1e-5)
        assert (out.logprobs[i, budget:] == 0).all() and (out.tokens[i, budget:] == 0).all()
    # A row depends only on its prompt, seed and sample index: alone, with a different batch, it draws the same
    # tokens (its log-probs agree to float32 rounding: alone it runs at another batch size, through another kernel).
    for i in (1, 4):
        alone = engine.generate([prompts[i]], budgets[i], SamplingParams(temperature=0.7), seeds=[3 + i])
        assert alone.row(0) == completions[i]
        np.testing.assert_allclose(alone.logprobs[0], out.logprobs[i], atol=1e-5)


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_decode.available(), reason=f"cpu_decode cannot run here: {cpu_decode.unavailable_reason()}"))])
def test_bfloat16_compute_with_cache_equals_recomputation(setup, pack):
    """bf16 compute over float32 parameters (how the RL stages run in bf16); the cache holds bf16 values. pack:
    decoding through the CPU bf16 matmul over packed weights (the default where it runs)."""
    model, params, _, prompts, _ = setup
    config = dataclasses.replace(model.config, dtype="bfloat16")
    model = Transformer(config)
    engine = make_engine(config, params, pack_weights=pack)
    assert make_engine(config, params).pack_weights == cpu_decode.available()  # the default
    out = engine.generate(prompts, NEW)
    completions = rows(out)
    # Rounding differs between the cached and the full forward, so near-ties may break either way: every greedy
    # token must be the argmax of the uncached forward up to bf16 error, and its log-prob must match.
    tokens, lengths = _padded([p + c for p, c in zip(prompts, completions)])
    logits = np.asarray(_forward_logits(model, params, tokens, lengths)[1])
    reference = _teacher_forced_logprobs(model, params, prompts, completions, 1.0)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        step_logits = logits[i, len(p) - 1: len(p) - 1 + len(c)]
        assert np.all(step_logits[np.arange(len(c)), c] >= step_logits.max(axis=-1) - 0.05)
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=3e-2)


def test_truncated_sampling_is_flagged_and_logprobs_stay_on_the_full_distribution(setup):
    model, params, engine, prompts, _ = setup
    out = engine.generate(prompts, NEW, SamplingParams(temperature=1.0, top_p=0.8, top_k=20), seeds=5)
    assert out.truncated
    reference = _teacher_forced_logprobs(model, params, prompts, rows(out), 1.0)
    for i in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[i], reference[i], atol=1e-5)
        # Renormalising over the kept tokens can only raise a token's probability.
        assert (out.sampling_logprobs[i] >= out.logprobs[i] - 1e-6).all()


def test_per_request_settings_share_one_batch(setup):
    """Greedy, temperature, top-k, top-p and min-p rows with their own seeds and limits in one call, each as it
    is alone."""
    _, _, engine, prompts, _ = setup
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3), SamplingParams(top_k=5),
                SamplingParams(top_p=0.7, temperature=0.9), SamplingParams(min_p=0.2)]
    together = engine.generate(prompts, [NEW, 7, NEW, 4, NEW], settings, seeds=[9, 8, 7, 6, 5])
    for i, s in enumerate(settings):
        alone = engine.generate([prompts[i]], [NEW, 7, NEW, 4, NEW][i], s, seeds=[9 - i])
        assert alone.row(0) == together.row(i), s


def test_group_samples_share_the_prompt_pages(setup):
    """A group's samples read the prompt's whole pages instead of computing them again; each computes only the
    page its own tokens start in. Samples are independent draws, each scored as its own uncached forward."""
    model, params, engine, prompts, _ = setup
    group = 3
    prompt = np.random.default_rng(4).integers(4, model.config.vocab_size, 20).tolist()  # two whole pages of 8
    before = engine.scheduler.prefilled
    sampled = engine.generate([prompt], NEW, SamplingParams(temperature=1.0), num_samples=group, seeds=11)
    assert engine.scheduler.prefilled - before == len(prompt) + (group - 1) * (len(prompt) - 16)
    completions = rows(sampled)
    assert len({tuple(r) for r in completions}) == group, "samples of one prompt must be independent draws"
    reference = _teacher_forced_logprobs(model, params, [prompt] * group, completions, 1.0)
    for r in range(group):
        np.testing.assert_allclose(sampled.logprobs[r], reference[r], atol=1e-5)
    greedy = engine.generate(prompts, NEW, num_samples=2)
    assert rows(greedy) == [r for r in _greedy_by_recomputation(model, params, prompts, NEW) for _ in range(2)]


def test_requests_sharing_a_system_prompt_share_its_pages(setup):
    """A later request whose prompt starts with the same 24 tokens (three pages) computes only the rest."""
    model, params, engine, _, _ = setup
    rng = np.random.default_rng(5)
    system = rng.integers(4, model.config.vocab_size, 24).tolist()
    first, second = system + [5, 6, 7], system + [9, 10]
    engine.generate([first], 4)
    before = engine.scheduler.prefilled
    out = engine.generate([second], 4)
    assert engine.scheduler.prefilled - before == len(second) - 24
    assert out.row(0) == _greedy_by_recomputation(model, params, [second], 4)[0]


def test_stop_ids_end_rows_early_and_per_row_limits(setup):
    _, _, engine, prompts, _ = setup
    free = engine.generate(prompts, NEW)
    stop = free.row(0)[4]
    limits = [NEW, 6, NEW, 2, NEW]
    out = engine.generate(prompts, limits, stop_ids=[stop])
    for i, limit in enumerate(limits):
        full = free.row(i)
        end = full.index(stop) + 1 if stop in full[:limit] else limit
        assert out.row(i) == full[:end]
        assert bool(out.stopped[i]) == (stop in full[:limit])
        assert (out.tokens[i, end:] == engine.pad_id).all() and (out.logprobs[i, end:] == 0).all()
    assert out.lengths[0] <= 5 and out.stopped[0]


def test_stop_strings_spanning_tokens_end_the_row_inside_the_loop(setup):
    _, _, engine, prompts, tokenizer = setup
    free = engine.generate(prompts[:1], 40)
    text = tokenizer.decode(free.row(0), skip_special=True)
    stop = text[len(text) // 3: len(text) // 3 + 6]  # several tokens long, well inside the text
    assert len(tokenizer.encode(stop)) > 1
    out = engine.generate(prompts[:1], 40, stop_strings=[stop])
    kept = out.row(0)
    assert stop in tokenizer.decode(kept, skip_special=True) and stop not in tokenizer.decode(kept[:-1],
                                                                                              skip_special=True)
    assert kept == free.row(0)[:len(kept)] and len(kept) < 40 and not out.stopped[0]
    assert finish(tokenizer, kept, False, [stop]) == {"text": text[:text.index(stop)], "num_tokens": len(kept),
                                                      "finish_reason": "stop"}


def test_pages_are_freed_and_a_small_cache_preempts_and_resumes(setup):
    """A cache of 6 pages of 8 tokens for 2 slots: sequences of up to 44 tokens cannot all fit, so the latest
    admitted is preempted, recomputed and resumed; greedy tokens and log-probs are the unconstrained ones."""
    model, params, engine, prompts, _ = setup
    small = make_engine(model.config, params, pages=7)
    budgets = [24, 24, 24, 20, 24]
    out = small.generate(prompts, budgets)
    expected = engine.generate(prompts, budgets)
    assert small.stats()["preemptions"] > 0
    assert rows(out) == rows(expected)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5)
    assert all(pool.in_use == 0 for pool in small.scheduler.pools)
    with pytest.raises(ValueError, match="needs 7 KV pages of 8 tokens; the cache holds 6"):
        small.generate([prompts[0]], 50)


def test_params_passed_per_call_replace_the_engines(setup):
    model, params, engine, prompts, _ = setup
    updated = jax.tree.map(lambda p: p * 1.5, params)  # e.g. a trainer's weights after an update
    out = engine.generate(prompts, NEW, params=updated)
    assert rows(out) == _greedy_by_recomputation(model, updated, prompts, NEW)


def test_lora_bound_params_sample_as_their_merge(setup):
    """Base + adapters handed over unmerged (what the RL stages pass) sample exactly as the merged weights: the
    engine folds them in once per set of weights. Checked on the engine's own path and on recomputation."""
    model, params, engine, prompts, _ = setup
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    adapters = lora.init_adapters(jax.random.key(1), nn.meta.unbox(lora.adapter_shapes(boxed, spec)), spec)
    adapters = jax.tree_util.tree_map_with_path(  # B = 0 at init: give the adapters an effect
        lambda p, x: 0.2 * jax.random.normal(jax.random.key(2), x.shape, x.dtype) if p[-1].key == "b" else x,
        adapters)
    merged = lora.merge(params, adapters, spec)
    bound = engine.generate(prompts, NEW, params=lora.bind(params, adapters, spec))
    plain = engine.generate(prompts, NEW, params=merged)
    assert rows(bound) == rows(plain) == _greedy_by_recomputation(model, merged, prompts, NEW)
    assert rows(bound) != rows(engine.generate(prompts, NEW))  # the adapters change what is sampled
    np.testing.assert_array_equal(np.asarray(bound.logprobs), np.asarray(plain.logprobs))


def test_cancelled_generation_frees_its_slots_and_pages(setup):
    _, _, engine, prompts, _ = setup
    answers = iter([False, False, True])
    with pytest.raises(Cancelled):
        engine.generate(prompts, NEW, cancelled=lambda: next(answers))
    assert not engine.has_work() and all(pool.in_use == 0 for pool in engine.scheduler.pools)
    assert rows(engine.generate(prompts, NEW, cancelled=lambda: False)) == rows(engine.generate(prompts, NEW))


def test_packed_weights_need_one_cpu_device(setup):
    model, params, *_ = setup
    config = dataclasses.replace(model.config, dtype="bfloat16")
    with pytest.raises(ValueError, match="one-device mesh"):
        make_engine(config, params, mesh=sharding.make_mesh({"data": -1}), pack_weights=True)
    assert not make_engine(config, params, mesh=sharding.make_mesh({"data": -1})).pack_weights


def test_sharded_mesh_gives_the_same_tokens(setup):
    """Four data shards (each with its own pages) and kv heads split over two devices."""
    model, params, engine, prompts, _ = setup
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    abstract = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    placed = jax.device_put(params, sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES))
    sharded = make_engine(model.config, placed, mesh, slots=8)
    out, reference = sharded.generate(prompts, NEW, num_samples=2), engine.generate(prompts, NEW, num_samples=2)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_allclose(out.logprobs, reference.logprobs, atol=1e-5)


def test_pallas_kernel_decoding_equals_the_gathered_views(setup):
    """The TPU kernel path (pages read at every decode step) in interpret mode against the CPU path."""
    model, params, engine, prompts, _ = setup
    kernel = make_engine(model.config, params, attention_impl="pallas_tpu", interpret=True)
    out = kernel.generate(prompts[:2], 5, SamplingParams(temperature=1.0), seeds=2)
    reference = engine.generate(prompts[:2], 5, SamplingParams(temperature=1.0), seeds=2)
    assert rows(out) == rows(reference)
    np.testing.assert_allclose(out.logprobs, reference.logprobs, atol=1e-5)


def test_bad_requests_are_refused_with_the_prompt_named(setup):
    _, _, engine, prompts, _ = setup
    too_long = [1] * (engine.max_len - 4)
    with pytest.raises(ValueError, match="prompt 1: .*exceeds the context length"):
        engine.generate([prompts[0], too_long], 8)
    with pytest.raises(ValueError, match="prompt 0: prompt is empty"):
        engine.generate([[]], 8)
    with pytest.raises(ValueError, match="max_new_tokens: 2 values for 5 prompts"):
        engine.generate(prompts, [4, 4])
    assert not engine.has_work()
