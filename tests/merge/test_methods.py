"""Each merge method against a float64 numpy implementation of its published formula, plus parameter resolution."""
import itertools

import numpy as np
import pytest

from alignment.merge import kernels
from alignment.merge.methods import (METHODS, NO_BASE, NonFiniteInput, flat_float32, magnitude_thresholds,
                                     merge_pieces, merge_tensor, trim_thresholds)
from alignment.merge.params import at_depth, depth, make_spec
from alignment.merge.sharded import merge_tensor_sharded, shard_axis

SHAPE = (6, 7, 53)  # 2226 elements: the kernels' blocks of 2048 and a short last one


def draw(rng, n, shape=SHAPE):
    """A base in [1, 2) and n models in [1, 2): float32 differences of such numbers are exact (Sterbenz),
    so the float32 implementation and the float64 reference rank |task vector| entries identically."""
    base = rng.uniform(1.0, 2.0, shape).astype(np.float32)
    models = [rng.uniform(1.0, 2.0, shape).astype(np.float32) for _ in range(n)]
    return models, base


def merge(method, models, base, seed=(0,), **params):
    params.setdefault("weights", (1.0,) * len(models))
    spec = make_spec(method, len(models), params)
    return merge_tensor(method, models, base, spec.resolve("layers/q_proj", 0, 1), seed)


# ----------------------------------------------------------------------------- float64 references


def ref_trim(tau, density):
    """mergekit's magnitude trim: the max(1, int(density * n)) largest |tau| (inputs here have no ties)."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.size))
    threshold = np.sort(np.abs(tau).ravel())[::-1][k - 1]
    return np.where(np.abs(tau) >= threshold, tau, 0.0)


def ref_disjoint_mean(taus, weights, election, normalize=True):
    """mergekit's TIES consensus: the sign of sum_i w_i tau_i ('sum') or of sum_i sign(w_i tau_i) ('count'), +
    where that sum is >= 0; the agreeing w_i tau_i summed, divided by the agreeing weights (1 where 0)."""
    w = np.asarray(weights, np.float64).reshape(-1, *(1,) * taus[0].ndim)
    weighted = w * np.stack(taus)
    total = weighted.sum(0) if election == "sum" else np.sign(weighted).sum(0)
    agree = np.sign(weighted) == np.where(total >= 0, 1.0, -1.0)
    numerator = (weighted * agree).sum(0)
    if not normalize:
        return numerator
    den = (w * agree).sum(0)
    return numerator / np.where(den == 0, 1.0, den)


def f64(xs):
    return [x.astype(np.float64) for x in xs]


def ref_dare_keep(seed, i, size, density):
    """The documented DARE draw, in plain Python integers: entry j of model i is kept when
    lowbias32(lowbias32(j ^ k0) ^ k1) >> 8 < density * 2**24, (k0, k1) from SeedSequence((*seed, i))."""
    k0, k1 = (int(k) for k in np.random.SeedSequence([*seed, i]).generate_state(2, np.uint32))

    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    return np.array([lowbias32(lowbias32(j ^ k0) ^ k1) >> 8 < int(density * (1 << 24)) for j in range(size)])


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    rng = np.random.default_rng(1)
    models, _ = draw(rng, 3)
    w = rng.uniform(0.2, 1.5, 3)
    want = sum(wi * m for wi, m in zip(w, f64(models)))
    want = want / w.sum() if normalize else want
    got = merge("linear", models, None, weights=tuple(w), normalize=normalize)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_linear_default_is_the_weighted_average():
    rng = np.random.default_rng(2)
    models, _ = draw(rng, 2)
    got = merge("linear", models, None, weights=(3.0, 1.0))
    np.testing.assert_allclose(got, 0.75 * models[0].astype(np.float64) + 0.25 * models[1], rtol=2e-6)


def test_task_arithmetic():
    rng = np.random.default_rng(3)
    models, base = draw(rng, 3)
    w, lam = rng.uniform(0.2, 1.5, 3), 0.7
    b = base.astype(np.float64)
    want = b + lam * sum(wi * (m - b) for wi, m in zip(w, f64(models)))
    got = merge("task_arithmetic", models, base, weights=tuple(w), lam=lam)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("election", ["sum", "count"])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties(election, density):
    rng = np.random.default_rng(4)
    models, base = draw(rng, 3)
    w, lam = rng.uniform(0.5, 1.5, 3), 0.9
    b = base.astype(np.float64)
    taus = [ref_trim(m - b, density) for m in f64(models)]
    want = b + lam * ref_disjoint_mean(taus, w, election)
    got = merge("ties", models, base, weights=tuple(w), lam=lam, density=density, election=election)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_trim_keeps_the_requested_fraction():
    tau = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    (threshold,) = trim_thresholds(flat_float32([tau]), NO_BASE, (0.25,))
    kept = np.where(np.abs(tau) >= threshold, tau, 0)
    assert np.count_nonzero(kept) == 250
    assert np.abs(kept[kept != 0]).min() >= np.abs(tau[kept == 0]).max()


@pytest.mark.parametrize("size, density, kept", [(10, 0.37, 3), (2226, 0.3335, 742), (7, 0.1, 1), (9, 0.99, 8)])
def test_trim_counts_entries_as_mergekit(size, density, kept):
    """mergekit keeps max(1, int(density * n)) entries: 3 of 10 at 0.37 (not round's 4), at least one."""
    tau = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    got = merge("ties", [tau], np.zeros_like(tau), density=density)
    assert np.count_nonzero(got) == kept
    np.testing.assert_array_equal(got[got != 0], tau[got != 0])  # one model: its kept entries, unscaled


def test_ties_per_model_densities_normalize_and_l1_rescale():
    """mergekit's per-model density, `normalize: false` (the agreeing task vectors summed, not averaged) and
    `rescale: true` (each trimmed task vector scaled back to its L1 norm)."""
    rng = np.random.default_rng(18)
    models, base = draw(rng, 3)
    w, densities = rng.uniform(0.5, 1.5, 3), (0.2, 0.5, 0.9)
    b = base.astype(np.float64)
    for normalize, rescale in [(False, "none"), (True, "l1"), (False, "inverse")]:
        taus = []
        for m, d in zip(f64(models), densities):
            tau, kept = m - b, ref_trim(m - b, d)
            scale = {"none": 1.0, "inverse": 1 / d, "l1": np.abs(tau).sum() / np.abs(kept).sum()}[rescale]
            taus.append(kept * scale)
        want = b + 0.8 * ref_disjoint_mean(taus, w, "sum", normalize)
        got = merge("ties", models, base, weights=tuple(w), densities=densities, lam=0.8, normalize=normalize,
                    rescale=rescale)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=5e-6, err_msg=f"{normalize} {rescale}")


def test_ties_election_with_negative_weights_and_a_zero_sum():
    """The sign elected is that of sum_i w_i tau_i, + where it is 0, and tau_i agrees when sign(w_i tau_i) does:
    a negative weight flips a model's vote (mergekit). The project elected 0 and used sign(tau_i) before."""
    base = np.zeros(4, np.float32)
    a = np.array([1.0, 2.0, -1.0, 3.0], np.float32)
    b = np.array([-1.0, 1.0, 1.0, -3.0], np.float32)
    got = merge("ties", [a, b], base, weights=(1.0, -1.0))
    # weighted: a = [1, 2, -1, 3], -b = [1, -1, -1, 3]: sums [2, 1, -2, 6] elect [+, +, -, +]
    # a agrees everywhere, -b at 0, 2, 3; where both agree their weights sum to 0, which divides by 1
    np.testing.assert_allclose(got, [2.0, 2.0, -2.0, 6.0])
    want = ref_disjoint_mean([a.astype(np.float64), b.astype(np.float64)], (1.0, -1.0), "sum")
    np.testing.assert_allclose(got, want)
    tied = merge("ties", [np.float32([1.0, -2.0]), np.float32([-1.0, 2.0])], np.zeros(2, np.float32))
    np.testing.assert_allclose(tied, [1.0, 2.0])  # a zero sum elects +: the positive entry alone


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare(method, rescale):
    """Per-model densities (mergekit's per-model `density`), each model's own draws and rescale."""
    rng = np.random.default_rng(6)
    models, base = draw(rng, 3)
    densities, w = (0.6, 0.3, 0.8), rng.uniform(0.5, 1.5, 3)
    b = base.astype(np.float64)
    taus = []
    for i, (m, density) in enumerate(zip(f64(models), densities)):
        tau = m - b
        kept = np.where(ref_dare_keep((42,), i, tau.size, density).reshape(SHAPE), tau, 0.0)
        scale = {"inverse": 1 / density, "l1": np.abs(tau).sum() / np.abs(kept).sum(), "none": 1.0}[rescale]
        taus.append(kept * scale)
    # mergekit's defaults: neither normalises (DARE-TIES sums the agreeing task vectors)
    delta = (sum(wi * t for wi, t in zip(w, taus)) if method == "dare_linear"
             else ref_disjoint_mean(taus, w, "sum", normalize=False))
    got = merge(method, models, base, (42,), weights=tuple(w), densities=densities, rescale=rescale)
    np.testing.assert_allclose(got, b + delta, rtol=2e-6, atol=5e-6)


def test_dare_keeps_density_and_is_unbiased():
    tau = np.random.default_rng(7).standard_normal(200_000).astype(np.float32)
    zero = np.zeros_like(tau)
    kept = merge("dare_linear", [tau], zero, density=0.3, rescale="inverse")
    assert abs(np.count_nonzero(kept) / tau.size - 0.3) < 0.01
    assert abs(kept.sum() - tau.sum()) < 0.03 * np.abs(tau).sum()
    l1 = merge("dare_linear", [tau], zero, density=0.3, rescale="l1")
    np.testing.assert_allclose(np.abs(l1).sum(), np.abs(tau).sum(), rtol=1e-5)


def ref_slerp(a, b, t, threshold=0.9995):
    cos = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    if abs(cos) > threshold:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t):
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    got = merge("slerp", [a, b], None, t=t)
    np.testing.assert_allclose(got, ref_slerp(a.astype(np.float64), b.astype(np.float64), t), rtol=1e-5, atol=1e-6)


def test_slerp_of_a_zero_tensor_is_at_a_right_angle():
    """mergekit counts a norm <= 1e-8 as 1, so a zero tensor has cosine 0 (the project took it as parallel)."""
    b = np.random.default_rng(19).standard_normal(SHAPE).astype(np.float32)
    got = merge("slerp", [np.zeros_like(b), b], None, t=0.3)
    np.testing.assert_allclose(got, np.sin(0.3 * np.pi / 2) * b.astype(np.float64), rtol=1e-6)


def test_slerp_nearly_parallel_is_linear():
    rng = np.random.default_rng(9)
    a = rng.standard_normal(SHAPE).astype(np.float32)
    b = (2.0 * a + 1e-4 * rng.standard_normal(SHAPE)).astype(np.float32)
    got = merge("slerp", [a, b], None, t=0.25)
    np.testing.assert_allclose(got, 0.75 * a.astype(np.float64) + 0.25 * b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock(n):
    rng = np.random.default_rng(10 + n)
    base = rng.standard_normal(SHAPE)
    shared = rng.standard_normal(SHAPE)  # correlated task vectors: a positive angle, as between real fine-tunes
    models = [(base + shared + 0.8 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(n)]
    base = base.astype(np.float32)
    b, ms = base.astype(np.float64), f64(models)
    taus = [m - b for m in ms]
    cos = np.mean([(x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()) for x, y in itertools.combinations(taus, 2)])
    assert 0.2 < cos < 0.9
    t = n * cos / (1 + (n - 1) * cos)
    want = t * np.mean(ms, axis=0) + (1 - t) * b
    np.testing.assert_allclose(merge("model_stock", models, base), want, rtol=1e-5, atol=1e-5)


def test_model_stock_with_opposed_task_vectors_keeps_the_base():
    """Exactly opposed task vectors: 1 + (N - 1) cos = 0 has no finite t, and mergekit keeps the base."""
    rng = np.random.default_rng(12)
    models, base = draw(rng, 2)
    opposed = [base + (models[0] - base), base - (models[0] - base)]
    np.testing.assert_allclose(merge("model_stock", opposed, base), base, atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_negative_cosine_extrapolates_unless_clamped(n):
    """mergekit does not clip the mean cosine: a negative one gives t < 0, a step away from the models' mean.
    clamp_cosine=True clips it to [0, 1] (then t = 0: the base)."""
    rng = np.random.default_rng(20 + n)
    base = rng.standard_normal(SHAPE)
    shared = rng.standard_normal(SHAPE)
    signs = [1.0, -1.0, -1.0][:n]
    models = [(base + s * shared + 1.2 * rng.standard_normal(SHAPE)).astype(np.float32) for s in signs]
    base = base.astype(np.float32)
    b, ms = base.astype(np.float64), f64(models)
    taus = [m - b for m in ms]
    cos = np.mean([(x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()) for x, y in itertools.combinations(taus, 2)])
    assert -0.45 < cos < -0.1
    t = n * cos / (1 + (n - 1) * cos)
    want = t * np.mean(ms, axis=0) + (1 - t) * b
    np.testing.assert_allclose(merge("model_stock", models, base), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merge("model_stock", models, base, clamp_cosine=True), base, atol=1e-6)


def test_normalize_by_a_zero_weight_sum_divides_by_one():
    """mergekit: |sum of weights| < 1e-8 divides by 1 instead of blowing up."""
    rng = np.random.default_rng(21)
    models, base = draw(rng, 2)
    got = merge("task_arithmetic", models, base, weights=(1.0, -1.0), normalize=True)
    np.testing.assert_allclose(got, base + (models[0] - models[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merging_identical_models_returns_that_model(method):
    rng = np.random.default_rng(13)
    models, base = draw(rng, 1)
    n = 2 if method in ("slerp", "model_stock") else 3
    # Weights summing to 1: task arithmetic and DARE-linear add task vectors up rather than averaging them.
    got = merge(method, [models[0]] * n, base if METHODS[method].needs_base else None, weights=(1 / n,) * n)
    np.testing.assert_allclose(got, models[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_weights_one_zero_return_the_first_model(method):
    rng = np.random.default_rng(14)
    models, base = draw(rng, 2)
    got = merge(method, models, base if METHODS[method].needs_base else None, weights=(1.0, 0.0))
    np.testing.assert_allclose(got, models[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "model_stock"])
def test_non_finite_input_is_named(method):
    rng = np.random.default_rng(17)
    models, base = draw(rng, 2)
    base = base if METHODS[method].needs_base else None
    models[1][2, 3, 40] = np.inf
    with pytest.raises(NonFiniteInput) as error:
        merge(method, models, base, density=0.5)
    assert (error.value.index, error.value.position) == (1, (2, 3, 40))
    if base is not None:
        models[1][2, 3, 40] = 1.5
        base[0, 0, 1] = np.nan
        with pytest.raises(NonFiniteInput) as error:
            merge(method, models, base, density=0.5)
        assert (error.value.index, error.value.position) == (2, (0, 0, 1))
    models[1][2, 3, 40], models[0][5, 6, 50] = 1.5, np.nan  # in the last piece of 301: still an index of S
    if base is not None:
        base[0, 0, 1] = 1.5
    p = make_spec(method, 2, dict(density=0.5, weights=(1.0, 1.0))).resolve("layers/q_proj", 0, 1)
    with pytest.raises(NonFiniteInput) as error:
        list(merge_pieces(method, models, base, p, piece_elements=301))
    assert (error.value.index, error.value.position) == (0, (5, 6, 50))


# ----------------------------------------------------------------------------- parameters


def test_anchors_interpolate_over_depth():
    assert depth("embed", None, 8) == 0.0 and depth("lm_head", None, 8) == 1.0
    assert depth("layers/q_proj", 7, 8) == 1.0
    for layer in range(5):
        d = depth("layers/up_proj", layer, 5)
        assert at_depth((0.2, 0.4, 1.0), d) == pytest.approx(np.interp(layer / 4 * 2, [0, 1, 2], [0.2, 0.4, 1.0]))


def test_overrides_by_pattern_first_match_wins():
    spec = make_spec("ties", 2, dict(density=0.5, weights=(1.0, (0.0, 1.0))),
                     overrides=[(r"q_proj|k_proj", dict(density=(0.1, 0.9))), (r"proj", dict(density=0.7, lam=2.0))])
    q = spec.resolve("layers/q_proj", 3, 4)
    assert q.density == pytest.approx(0.9) and q.lam == 2.0 and q.weights == (1.0, 1.0)
    assert spec.resolve("layers/q_proj", 0, 4).density == pytest.approx(0.1)
    up = spec.resolve("layers/up_proj", 1, 4)
    assert up.density == 0.7 and up.weights == pytest.approx((1.0, 1 / 3))
    assert spec.resolve("embed", None, 4).density == 0.5
    assert spec.unmatched_patterns(["embed", "layers/q_proj"]) == []
    assert make_spec("ties", 2, {}, [("nothing_like_this", dict(lam=1.0))]).unmatched_patterns(["embed"])


def test_method_defaults_are_mergekits():
    """normalize and rescale default as in mergekit (its `rescale: true` is 'l1'), so a config naming only the method,
    weights and densities merges as the same mergekit YAML does."""
    want = {"linear": (True, "none"), "task_arithmetic": (False, "none"), "ties": (True, "none"),
            "dare_ties": (False, "l1"), "dare_linear": (False, "l1")}
    for method, defaults in want.items():
        p = make_spec(method, 2, {}).resolve("embed", None, 1)
        assert (p.normalize, p.rescale) == defaults, method
    assert make_spec("model_stock", 2, {}).resolve("embed", None, 1).clamp_cosine is False


@pytest.mark.parametrize("values, message", [
    (dict(densty=0.5), "Did you mean 'density'"),
    (dict(density=0.0), "density must lie in"),
    (dict(weights=(1.0,)), "one per model"),
    (dict(election="max"), "election"),
    (dict(rescale="l2"), "rescale"),
])
def test_bad_parameters_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        make_spec("dare_ties", 2, values)


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match="model_stock"):
        make_spec("model_stok", 2, {})


def test_kth_largest_is_exact_with_ties_and_edges():
    rng = np.random.default_rng(15)
    for values in (np.abs(rng.standard_normal(5000)), rng.integers(0, 4, 5000), np.float32([0.0, 3.0])):
        values = np.asarray(values, np.float32)
        for k in {1, 2, max(1, values.size // 3), values.size}:
            assert magnitude_thresholds(flat_float32([values]), NO_BASE, [k]) == (np.sort(values)[::-1][k - 1],)
    models, base = draw(rng, 3)  # several models in one pass, each with its own threshold and rank
    taus = [np.abs(m - base).ravel() for m in models]
    got = magnitude_thresholds(flat_float32(models), flat_float32([base])[0], [700, 5, 2000])
    assert got == tuple(np.sort(t)[::-1][k - 1] for t, k in zip(taus, [700, 5, 2000]))


# ----------------------------------------------------------------------------- sharded


CASES = [("linear", {}), ("task_arithmetic", dict(lam=0.8)), ("ties", dict(density=0.3)),
         ("ties", dict(density=0.5, election="count")), ("dare_linear", dict(density=0.6)),
         ("dare_ties", dict(density=0.4, rescale="l1")), ("slerp", dict(t=0.3)), ("model_stock", {})]


def case_inputs(method, shape=SHAPE):
    rng = np.random.default_rng(16)
    models, base = draw(rng, 2 if method in ("slerp", "model_stock") else 3, shape)
    base = base if METHODS[method].needs_base else None
    return models, base, tuple(rng.uniform(0.5, 1.5, len(models)))


def test_dare_draws_are_the_documented_hash():
    keys = kernels.dare_keys((5, 6), 2)
    index = np.arange(3000, dtype=np.uint32)
    for i in range(2):
        want = ref_dare_keep((5, 6), i, index.size, 0.37)
        np.testing.assert_array_equal(kernels.dare_bits(np, keys[i], index) < kernels.dare_cut(0.37), want)
    tau = np.ones(3000, np.float32)
    kept = merge("dare_linear", [tau, tau], np.zeros_like(tau), (5, 6), density=0.37, weights=(1.0, 0.0))
    np.testing.assert_array_equal(kept != 0, ref_dare_keep((5, 6), 0, 3000, 0.37))


@pytest.mark.parametrize("method, params", [("ties", dict(density=0.4)), ("dare_ties", dict(density=0.6)),
                                            ("dare_linear", dict(density=0.5, rescale="l1")), ("slerp", {}),
                                            ("model_stock", {}), ("linear", {})])
def test_pieces_are_the_whole(method, params):
    """Pieces of a reused buffer (an odd size, across the loops' blocks) hold exactly the whole tensor's values:
    the statistics are the whole tensor's and DARE draws by index in the tensor."""
    models, base, w = case_inputs(method)
    p = make_spec(method, len(models), dict(weights=w, **params)).resolve("layers/q_proj", 0, 1)
    whole = merge_tensor(method, models, base, p, (4,)).reshape(-1)
    pieces = [(first, values.copy())
              for first, values in merge_pieces(method, models, base, p, (4,), piece_elements=301)]
    assert [first for first, _ in pieces] == list(range(0, whole.size, 301))
    np.testing.assert_array_equal(np.concatenate([values for _, values in pieces]), whole)


def test_kernels_refuse_arrays_they_cannot_read():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="model 1: need an aligned C-contiguous 1-D float32 array of 10 elements"):
        kernels.gram((x, np.ones(10)), NO_BASE)
    with pytest.raises(ValueError, match="base: need .* of 10 elements"):
        kernels.gram((x,), np.ones(9, np.float32))
    with pytest.raises(ValueError, match="model 0"):
        kernels.l1_norms((np.ones(20, np.float32)[::2],), NO_BASE, [0.0], [[1, 2]], [3])
    misaligned = np.frombuffer(b"\0" + np.arange(10, dtype=np.float32).tobytes(), np.float32, 10, offset=1)
    with pytest.raises(ValueError, match="model 0: need an aligned"):
        kernels.gram((misaligned,), NO_BASE)
    # A tensor at an odd offset of a mapped file is copied to aligned memory before the loops see it.
    np.testing.assert_array_equal(merge("linear", [misaligned], None), np.arange(10, dtype=np.float32))


def test_kernels_stop_when_an_input_changed_between_passes():
    x = np.full(100, 3.0, np.float32)
    bucket = np.array([x.view(np.uint32)[0] >> 16], np.int64)
    out = np.empty(5, np.float32)
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        kernels.bucket_magnitudes((x,), NO_BASE, bucket, np.array([0, 5]), out)  # the histogram counted 5, not 100


def test_a_build_from_other_sources_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_LOOPS_VERSION", kernels._LOOPS_VERSION + 1)
    with pytest.raises(ImportError, match="built from other sources"):
        kernels._library()


def test_dare_seed_changes_the_masks():
    tau = np.ones(4096, np.float32)
    run = lambda seed: merge("dare_linear", [tau], np.zeros_like(tau), seed, density=0.5)
    np.testing.assert_array_equal(run((1,)), run((1,)))
    assert np.mean((run((1,)) != 0) == (run((2,)) != 0)) < 0.6  # independent masks agree about half the time


def test_shard_axis_is_the_largest_divisible():
    assert shard_axis((3, 16, 24), 8) == 2 and shard_axis((16, 16), 8) == 0 and shard_axis((6, 7), 8) is None


@pytest.mark.parametrize("method, params", CASES)
def test_sharded_equals_host(method, params):
    models, base, w = case_inputs(method, shape=(5, 16, 3))  # 8 simulated devices split the 16 axis
    p = make_spec(method, len(models), dict(weights=w, **params)).resolve("layers/q_proj", 0, 1)
    want = merge_tensor(method, models, base, p, (3,))
    got = merge_tensor_sharded(method, models, base, p, (3,))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
