"""model/linear.project: the same values and gradients as jnp.einsum, whichever operand its backward
puts on the left, with the token axes merged or not, in float32 and in bfloat16 with float32 output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.model.linear import project

CASES = [  # spec, x shape, w shape: wide outputs (x smaller than dy) and narrow ones (dy smaller)
    ("nld,df->nlf", (2, 5, 4), (4, 12)),
    ("nlf,fd->nld", (2, 5, 12), (12, 4)),
    ("nld,dqh->nlqh", (2, 5, 4), (4, 3, 2)),
    ("nlqh,qhd->nld", (2, 5, 3, 2), (3, 2, 4)),
    ("ncd,vd->ncv", (3, 4, 5), (40, 5)),
    ("nd,vd->nv", (3, 5), (7, 5)),
]


@pytest.mark.parametrize("spec,x_shape,w_shape", CASES)
@pytest.mark.parametrize("dtype,out", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_project_matches_einsum(spec, x_shape, w_shape, dtype, out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    w = jnp.asarray(rng.normal(size=w_shape), dtype)
    y_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x, w).shape
    cot = jnp.asarray(rng.normal(size=y_shape), out or dtype)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * cot.astype(jnp.float32))

    ours = lambda a, b: project(spec, a, b, out)
    ref = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=out)
    y, y_ref = ours(x, w), ref(x, w)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    grads = jax.grad(loss(ours), argnums=(0, 1))(x, w)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)


def test_project_under_remat_and_vmap():
    """The custom gradient composes with jax.checkpoint (the remat'd blocks) and vmap."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    f = lambda fn: lambda a, b: jnp.sum(jnp.tanh(jax.vmap(lambda xi: fn(xi, b))(a)) ** 2)
    ours = jax.checkpoint(lambda a, b: project("nld,df->nlf", a, b), policy=jax.checkpoint_policies.dots_saveable)
    ref = lambda a, b: jnp.einsum("nld,df->nlf", a, b)
    g, g_ref = jax.grad(f(ours), argnums=(0, 1))(x, w), jax.grad(f(ref), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
