"""The train step's GPU-minded pieces, checked on CPU: the cross-entropy's custom gradient, the
choice of cuDNN attention on GPUs and its fallbacks, and the benchmark's sweep syntax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jamba_jax.layers import attention as A
from jamba_jax.train.loop import cross_entropy


def _reference_ce(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_value_and_gradient(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 7, 41)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, 41, (3, 7)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(3, 7)), jnp.float32)
    ce = jax.jit(cross_entropy)(logits, targets)
    assert ce.dtype == jnp.float32 and ce.shape == (3, 7)
    np.testing.assert_allclose(ce, _reference_ce(logits, targets), rtol=1e-6, atol=1e-5)
    ours = jax.grad(lambda x: jnp.sum(weights * cross_entropy(x, targets)))(logits)
    ref = jax.grad(lambda x: jnp.sum(weights * _reference_ce(x, targets)))(logits)
    assert ours.dtype == dtype  # the logits' gradient is written once, in their dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol)


def _qkv(b=2, l=200, h=4, g=2, d=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, l, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, l, g, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, l, g, d)), dtype)
    return q, k, v


def _packed(b, l):
    seg = np.ones((b, l), np.int32)
    seg[0, l // 3:] = 2
    seg[-1, l - 17:] = 0  # trailing padding
    return jnp.asarray(seg)


def _grads(fn, q, k, v, seg):
    return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg).astype(jnp.float32))), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("block_q", [64, 128, 512])
def test_blockwise_masked_attention_matches_xla(block_q):
    q, k, v = _qkv()
    seg = _packed(2, 200)
    ref = A.xla_attention(q, k, v, seg)
    fn = lambda q, k, v, s: A.blockwise_masked_attention(q, k, v, s, block_q=block_q)  # noqa: E731
    np.testing.assert_allclose(fn(q, k, v, seg), ref, atol=2e-6)
    for ours, theirs in zip(_grads(fn, q, k, v, seg), _grads(A.xla_attention, q, k, v, seg)):
        np.testing.assert_allclose(ours, theirs, atol=5e-5)


def test_auto_picks_cudnn_on_gpu_only(monkeypatch):
    assert A.resolve_impl("auto") == "xla"  # this CPU
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    assert A.resolve_impl("auto") == "cudnn"
    monkeypatch.setattr(A, "GPU_AUTO_IMPL", "xla")
    assert A.resolve_impl("auto") == "xla"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "tpu")
    assert A.resolve_impl("auto") == "splash"
    assert A.resolve_impl("cudnn") == "cudnn"


def test_cudnn_falls_back_to_xla_without_cudnn():
    # float32 never goes to cuDNN; bf16 does, and on this CPU cuDNN's own checks refuse it
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = _qkv(dtype=dtype)
        seg = _packed(2, 200)
        for s in (None, seg):
            np.testing.assert_array_equal(np.asarray(A.cudnn_attention(q, k, v, s), np.float32),
                                          np.asarray(A.xla_attention(q, k, v, s), np.float32))


def test_cudnn_path_with_segments(monkeypatch):
    """With cuDNN standing in (XLA's causal attention), one document per row takes the flash kernel
    and packed rows the blockwise masked path; both equal XLA attention, values and gradients."""
    calls = []

    def fake_flash(q, k, v, scale=None):
        calls.append("flash")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")

    monkeypatch.setattr(A, "_flash", fake_flash)
    q, k, v = _qkv(dtype=jnp.bfloat16, l=160)
    for seg in (jnp.ones((2, 160), jnp.int32), _packed(2, 160)):
        ours = jax.jit(A.cudnn_attention)(q, k, v, seg)
        ref = A.xla_attention(q, k, v, seg)
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=2e-2)
        for a, b in zip(_grads(A.cudnn_attention, q, k, v, seg), _grads(A.xla_attention, q, k, v, seg)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=6e-2)
    assert calls  # the stand-in was traced
    np.testing.assert_allclose(np.asarray(A.cudnn_attention(q, k, v), np.float32),
                               np.asarray(A.xla_attention(q, k, v), np.float32), atol=2e-2)


def test_benchmark_sweep_syntax():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "train_throughput.py")
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sweep = bench.parse_sweep(bench.DEFAULT_SWEEP)
    assert set(sweep) == {"mamba2", "hybrid"}
    assert sweep["hybrid"][0] == {"batch": 8, "remat": "dots", "accum": 1}
    assert bench.parse_sweep("hybrid:8/none/2")["hybrid"] == [{"batch": 8, "remat": "none", "accum": 2}]
    with pytest.raises(SystemExit):
        bench.parse_sweep("hybrid:8/some")
