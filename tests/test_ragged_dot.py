"""``pallas_kernels.ragged_dot``: the custom VJP around the grouped-matmul kernels, on the CPU with reference
kernels of the same contracts (the Mosaic GPU kernels have no CPU interpreter; ``benchmarks/moe.py`` checks
them on a GPU), and the ``impl`` switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_dot import Kernels, grouped_vjp, ragged_dot, reference_kernels
from tests.helpers import rel_l2


def _unwritten_rows_nan(kernels: Kernels) -> Kernels:
    """The reference kernels, with rows past the groups holding NaN as the GPU kernels' unwritten memory may,
    refusing row counts that are not a multiple of 8 as the GPU kernels do."""
    def poison(f):
        def g(a, w, gs):
            assert a.shape[0] % 8 == 0, a.shape
            out = f(a, w, gs)
            return jnp.where((jnp.arange(out.shape[0]) < jnp.sum(gs))[:, None], out, jnp.nan)
        return g
    def rows_of_8(f):
        def g(a, b, gs):
            assert a.shape[0] % 8 == 0 and b.shape[0] % 8 == 0, (a.shape, b.shape)
            return f(a, b, gs)
        return g
    return Kernels(poison(kernels.forward), poison(kernels.input_grad), rows_of_8(kernels.weight_grad))


@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (4, 7, 2, 0)], ids=["all-rows", "rows-past-groups"])
def test_custom_vjp_matches_ragged_dot(sizes):
    rng = np.random.default_rng(sum(sizes))
    m, k, n = 17, 12, 10
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    grouped = grouped_vjp(_unwritten_rows_nan(reference_kernels()), row_tile=8)  # 17 rows padded to 24

    def loss(f, x, w):
        return jnp.sum(jnp.sin(f(x, w, gs)) * ct)

    want = jax.value_and_grad(lambda x, w: loss(jax.lax.ragged_dot, x, w), argnums=(0, 1))(x, w)
    got = jax.jit(jax.value_and_grad(lambda x, w: loss(grouped, x, w), argnums=(0, 1)))(x, w)
    assert np.isfinite(float(got[0]))
    assert abs(float(got[0]) - float(want[0])) < 1e-5 * abs(float(want[0]))
    assert rel_l2(got[1][0], want[1][0]) < 1e-6 and rel_l2(got[1][1], want[1][1]) < 1e-6
    if sum(sizes) < m:  # rows past the groups: zero output, zero input gradient
        assert float(jnp.abs(grouped(x, w, gs)[sum(sizes):]).max()) == 0.0
        assert float(jnp.abs(got[1][0][sum(sizes):]).max()) == 0.0


def test_impl_switch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(9, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.bfloat16)
    gs = jnp.asarray([2, 4, 3], jnp.int32)
    want = jax.lax.ragged_dot(x, w, gs)
    assert jnp.array_equal(ragged_dot(x, w, gs, impl="xla"), want)
    assert jnp.array_equal(ragged_dot(x, w, gs), want)  # auto: no Hopper GPU here
    with pytest.raises(ValueError, match="impl must be"):
        ragged_dot(x, w, gs, impl="triton")
