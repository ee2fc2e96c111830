"""Causal conv1d and the gated RMSNorm against naive loops."""

import jax
import jax.numpy as jnp
import numpy as np

from jamba_jax.ops import causal_conv1d, gated_rms_norm, positions_from_segments
from tests.helpers import rel_l2


def _conv_naive(x, w, bias, seg, init):
    b, l, c = x.shape
    k = w.shape[0]
    y = np.zeros((b, l, c))
    for bi in range(b):
        for t in range(l):
            acc = bias.astype(np.float64).copy()
            for j in range(k):
                s = t - (k - 1) + j
                if s >= 0:
                    if seg[bi, s:t + 1].min() == seg[bi, s:t + 1].max() and np.all(seg[bi, s:t + 1] == seg[bi, t]):
                        acc += w[j] * x[bi, s]
                elif np.all(seg[bi, :t + 1] == seg[bi, 0]):
                    acc += w[j] * init[bi, k - 1 + s]
            y[bi, t] = acc
    return y


def test_causal_conv1d_matches_naive_loop_with_segments_and_state():
    rng = np.random.default_rng(0)
    b, l, c, k = 2, 19, 5, 4
    x, w, bias = rng.normal(size=(b, l, c)), rng.normal(size=(k, c)), rng.normal(size=(c,))
    init = rng.normal(size=(b, k - 1, c))
    seg = np.array([[1] * 6 + [2] * 2 + [3] * 11, [4] * 19])
    y, final = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), segment_ids=jnp.asarray(seg),
                             initial_state=jnp.asarray(init), return_final_state=True)
    assert rel_l2(y, _conv_naive(x, w, bias, seg, init)) < 1e-6
    np.testing.assert_allclose(final[1], x[1, -3:], rtol=1e-6)  # one document: the last k-1 inputs
    np.testing.assert_allclose(final[0], x[0, -3:], rtol=1e-6)  # last document is 11 long


def test_causal_conv1d_streaming_equals_one_pass():
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.normal(size=(2, 23, 6))), jnp.asarray(rng.normal(size=(4, 6)))
    full = causal_conv1d(x, w)
    y1, state = causal_conv1d(x[:, :10], w, return_final_state=True)
    y2 = causal_conv1d(x[:, 10:], w, initial_state=state)
    assert rel_l2(jnp.concatenate([y1, y2], axis=1), full) < 1e-6


def test_causal_conv1d_gradients_match_naive():
    rng = np.random.default_rng(2)
    x, w, bias = (jnp.asarray(rng.normal(size=s)) for s in ((1, 9, 3), (3, 3), (3,)))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3]])

    def naive(x, w, bias):  # explicit per-lag masked sum, written independently of the op
        out = bias + w[-1] * x
        for lag in range(1, w.shape[0]):
            shifted = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :-lag]
            same = jnp.pad(seg, ((0, 0), (lag, 0)), constant_values=-1)[:, :-lag] == seg
            out = out + w[-1 - lag] * jnp.where(same[..., None], shifted, 0.0)
        return out

    ct = jnp.asarray(rng.normal(size=(1, 9, 3)))
    g_op = jax.grad(lambda *a: jnp.sum(causal_conv1d(*a, segment_ids=seg) * ct), argnums=(0, 1, 2))(x, w, bias)
    g_ref = jax.grad(lambda *a: jnp.sum(naive(*a) * ct), argnums=(0, 1, 2))(x, w, bias)
    for a, b in zip(g_op, g_ref):
        assert rel_l2(a, b) < 1e-6


def test_gated_rms_norm_groups():
    rng = np.random.default_rng(3)
    x, z, w = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 5, 12)), rng.normal(size=(12,))
    h = x * z / (1 + np.exp(-z))
    g = h.reshape(2, 5, 3, 4)
    expected = (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(2, 5, 12) * w
    got = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), group_size=4, eps=1e-5)
    assert rel_l2(got, expected) < 1e-6


def test_positions_restart_per_segment():
    seg = jnp.asarray([[3, 3, 3, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2, 3]])
