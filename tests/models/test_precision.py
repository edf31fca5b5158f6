"""models/precision.project: values and both gradients against float64 numpy, in float32 and in bfloat16."""
import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from alignment.models.precision import project

# (spec, x shape, w shape): the model's projections.
SPECS = [
    ("bsd,dhk->bshk", (2, 5, 16), (16, 4, 8)),
    ("bshk,hkd->bsd", (2, 5, 4, 8), (4, 8, 16)),
    ("bsd,df->bsf", (2, 5, 16), (16, 24)),
    ("bsf,fd->bsd", (2, 5, 24), (24, 16)),
]


def bf16_values(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16, as float64."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_project_matches_float64(spec, x_shape, w_shape, dtype):
    rng = np.random.default_rng()
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    out_shape = jax.eval_shape(lambda x, w: jnp.einsum(spec, x, w), x, w).shape
    g = rng.normal(size=out_shape).astype(np.float32)
    x_in = jnp.asarray(x, dtype)

    def loss(x, w):
        return jnp.sum(project(spec, x, w).astype(jnp.float32) * g)

    out = project(spec, x_in, jnp.asarray(w))
    dx, dw = jax.grad(loss, argnums=(0, 1))(x_in, jnp.asarray(w))
    assert out.dtype == jnp.dtype(dtype) and dx.dtype == jnp.dtype(dtype) and dw.dtype == jnp.float32

    if dtype == "float32":
        x64, w64, g64, tol = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64), 1e-5
    else:  # inputs, weights and the incoming gradient are rounded to bf16; products accumulate in float32
        x64, w64, g64, tol = bf16_values(x), bf16_values(w), bf16_values(g), 1e-2
    inputs, out_spec = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    expected = np.einsum(spec, x64, w64)
    expected_dx = np.einsum(f"{out_spec},{w_spec}->{x_spec}", g64, w64)
    expected_dw = np.einsum(f"{x_spec},{out_spec}->{w_spec}", x64, g64)
    for actual, want in ((out, expected), (dx, expected_dx), (dw, expected_dw)):
        actual = np.asarray(actual, np.float64)
        # Relative to the typical magnitude: bf16 rounds each output to 8 bits of mantissa.
        np.testing.assert_allclose(actual, want, atol=tol * np.abs(want).max(), rtol=tol)


def test_bfloat16_gradients_use_bf16_matmuls():
    """All three matmuls take bf16 operands (the point of the module), accumulating in float32."""
    x = jnp.ones((2, 5, 16), jnp.bfloat16)
    w = jnp.ones((16, 24), jnp.float32)
    grad = jax.grad(lambda x, w: jnp.sum(project("bsd,df->bsf", x, w).astype(jnp.float32)), argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad)(x, w)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(jaxpr.jaxpr))
    assert len(found) == 3
    for eqn in found:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.outvars[0].aval.dtype == jnp.float32
