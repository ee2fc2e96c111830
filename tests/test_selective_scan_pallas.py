"""Pallas selective-scan kernels (GPU / Triton and TPU / Mosaic) in interpret mode on CPU.

Both backends are compared with the sequential reference, values and the gradients of every
input (initial_state included), with small block sizes so that every code path runs: several
channel blocks, groups spanning blocks, several checkpoint chunks with l not a multiple of
the chunk, segment resets inside and on chunk boundaries, and n not a power of two.
"""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_lowering import cuda_target
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference
from pallas_kernels.selective_scan.pallas_gpu import GpuConfig, selective_scan_pallas_gpu
from pallas_kernels.selective_scan.pallas_tpu import TpuConfig, selective_scan_pallas_tpu
from tests.helpers import rel_l2
from tests.test_selective_scan import DIFFERENTIABLE, make_inputs, segments_from_starts

# Small blocks: chunk 8 with sub-chunks of 2 (GPU) exercises both recompute levels; the
# default forward path (prefetch of the next group, B / C included) runs here, the one
# without prefetch in the bf16 test.
GPU_CFG = GpuConfig(fwd_d_block=4, unroll=2, bwd_d_block=4, chunk=8, sub_chunk=2)
TPU_CFG = TpuConfig(d_block=4, chunk=8)
BACKENDS = {
    "gpu": functools.partial(selective_scan_pallas_gpu, interpret=True, config=GPU_CFG),
    "tpu": functools.partial(selective_scan_pallas_tpu, interpret=True, config=TPU_CFG),
}

CASES = {
    # name: (make_inputs kwargs, optional inputs, delta_softplus, segment starts)
    # l = 29: 3 full chunks of 8 + a tail of 5 (GPU: 2 full sub-chunks + 1 step);
    # starts 5 (inside a chunk) and 16 (on a chunk start); g = 2 groups of 8 channels,
    # two channel blocks per group.
    "grouped_all_options_segments": (
        dict(b=2, l=29, d=16, n=4, groups=2),
        ("D", "z", "delta_bias", "initial_state"), True, (5, 16),
    ),
    # ungrouped, plain delta, n = 3 (padded to 4 on GPU), l = 13 (GPU tail: 2 steps).
    "ungrouped_plain_delta_odd_n": (dict(b=1, l=13, d=8, n=3), ("initial_state",), False, None),
}


def _values_and_grads(fn, args, softplus, seg, cotangents):
    @jax.jit
    def run(args):
        out, vjp = jax.vjp(lambda a: fn(**a, delta_softplus=softplus, segment_ids=seg), args)
        return out, vjp(cotangents)[0]
    return run(args)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_values_and_grads(backend, case):
    kwargs, optional, softplus, starts = CASES[case]
    x = make_inputs(11, **kwargs)
    names = ("u", "delta", "A", "B", "C", *optional)
    args = {k: x[k] for k in names}
    b, l = x["u"].shape[:2]
    seg = None if starts is None else segments_from_starts(b, l, starts)
    rng = np.random.default_rng(12)
    cotangents = tuple(
        jnp.asarray(rng.standard_normal(x[k].shape), jnp.float32) for k in ("u", "initial_state"))

    (y_ref, s_ref), g_ref = _values_and_grads(selective_scan_reference, args, softplus, seg, cotangents)
    (y, s), g = _values_and_grads(BACKENDS[backend], args, softplus, seg, cotangents)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert s.shape == s_ref.shape and s.dtype == jnp.float32
    assert rel_l2(y, y_ref) < 1e-5
    assert rel_l2(s, s_ref) < 1e-5
    for name in names:
        assert g[name].shape == args[name].shape and g[name].dtype == args[name].dtype, name
        assert rel_l2(g[name], g_ref[name]) < 1e-5, name


def test_cases_cover_every_differentiable_input():
    used = set()
    for _, optional, _, _ in CASES.values():
        used |= {"u", "delta", "A", "B", "C", *optional}
    assert used == set(DIFFERENTIABLE)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_values_and_grads(backend):
    """bf16 in and out (values and input gradients), float32 state; vs the float32 reference
    on the same (bf16-representable) values."""
    x16 = make_inputs(13, b=1, l=21, d=8, n=4, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x16.items()}
    seg = segments_from_starts(1, 21, [9])
    dy = jnp.asarray(np.random.default_rng(14).standard_normal((1, 21, 8)), jnp.float32)

    def run(fn, x, cot_dtype):
        @jax.jit
        def go(x):
            (y, s), vjp = jax.vjp(
                lambda a: fn(**a, delta_softplus=True, segment_ids=seg), x)
            return y, s, vjp((dy.astype(cot_dtype), jnp.zeros_like(s)))[0]
        return go(x)

    fn = BACKENDS[backend]
    if backend == "gpu":   # the other forward path: no register prefetch
        fn = functools.partial(selective_scan_pallas_gpu, interpret=True, config=GpuConfig(
            fwd_d_block=8, unroll=4, prefetch=False, bwd_d_block=8, chunk=8, sub_chunk=4))
    y16, s16, g16 = run(fn, x16, jnp.bfloat16)
    y32, s32, g32 = run(selective_scan_reference, x32, jnp.float32)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_l2(y16.astype(jnp.float32), y32) < 1e-2
    assert rel_l2(s16, s32) < 1e-5
    for name in x16:
        assert g16[name].dtype == jnp.bfloat16, name
        assert rel_l2(g16[name].astype(jnp.float32), g32[name]) < 1e-2, name


# --------------------------------------------------------------------------- sequence splits
# GPU kernels with the sequence split across programs (GpuConfig.seq_splits / bwd_seq_splits):
# chunk 8 and l = 69 = 8 chunks + a tail of 5 (taken by the last split).  S = 2 splits at 32,
# S = 4 at 16, 32, 48.  Row 0 resets at 5 (inside split 0), 32 (on a split's first step) and
# 66 (in the tail): every carry across a split is cut; row 1 resets only at 40, so its
# segments (and initial_state) run across split boundaries and the chains carry real decays.
SPLIT_L = 69
SPLIT_CASES = {
    # name: (GpuConfig, make_inputs kwargs, optional inputs, delta_softplus, segments)
    "fwd2_bwd4_all_options": (
        GpuConfig(fwd_d_block=4, unroll=2, bwd_d_block=4, chunk=8, sub_chunk=2,
                  seq_splits=2, bwd_seq_splits=4),
        dict(b=2, l=SPLIT_L, d=16, n=4, groups=2),
        ("D", "z", "delta_bias", "initial_state"), True, True),
    # S = 4 forward (no B / C prefetch) with an unsplit backward (it restarts from the
    # checkpoints the split forward stored), odd n (padded), plain delta
    "fwd4_bwd1_plain_delta": (
        GpuConfig(fwd_d_block=4, unroll=4, prefetch_bc=False, bwd_d_block=8, chunk=8,
                  sub_chunk=4, seq_splits=4, bwd_seq_splits=1),
        dict(b=2, l=SPLIT_L, d=8, n=3),
        ("D", "z", "initial_state"), False, True),
    # no segments and no initial state (the first split starts from zeros), S = 4 both ways;
    # l = 37 = 4 chunks + 5: one chunk per split
    "fwd4_bwd4_no_segments": (
        GpuConfig(fwd_d_block=8, unroll=2, bwd_d_block=8, chunk=8, sub_chunk=2,
                  seq_splits=4, bwd_seq_splits=4),
        dict(b=1, l=37, d=8, n=4),
        ("delta_bias",), True, False),
}


def _split_segments(b, l):
    ids = np.zeros((b, l), np.int32)
    for t in (5, 32, 66):
        ids[0, t:] += 1
    ids[1:, 40:] += 1
    return jnp.asarray(ids)


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_gpu_sequence_splits_match_reference(case):
    """float32 values, final state and the gradient of every input, vs the sequential scan."""
    cfg, kwargs, optional, softplus, with_segments = SPLIT_CASES[case]
    x = make_inputs(31, **kwargs)
    names = ("u", "delta", "A", "B", "C", *optional)
    args = {k: x[k] for k in names}
    b, l = x["u"].shape[:2]
    seg = _split_segments(b, l) if with_segments else None
    rng = np.random.default_rng(32)
    cotangents = tuple(
        jnp.asarray(rng.standard_normal(x[k].shape), jnp.float32) for k in ("u", "initial_state"))
    fn = functools.partial(selective_scan_pallas_gpu, interpret=True, config=cfg)

    (y_ref, s_ref), g_ref = _values_and_grads(
        selective_scan_reference, args, softplus, seg, cotangents)
    (y, s), g = _values_and_grads(fn, args, softplus, seg, cotangents)
    assert rel_l2(y, y_ref) < 1e-5
    assert rel_l2(s, s_ref) < 1e-5
    for name in names:
        assert g[name].shape == args[name].shape and g[name].dtype == args[name].dtype, name
        assert rel_l2(g[name], g_ref[name]) < 1e-5, name


def test_gpu_sequence_splits_bf16():
    """bf16 in and out with S = 2 forward / S = 4 backward, segments, every option."""
    cfg = GpuConfig(fwd_d_block=8, unroll=2, bwd_d_block=8, chunk=8, sub_chunk=4,
                    seq_splits=2, bwd_seq_splits=4)
    x16 = make_inputs(33, b=2, l=SPLIT_L, d=8, n=4, dtype=jnp.bfloat16)
    x32 = {k: v.astype(jnp.float32) for k, v in x16.items()}
    seg = _split_segments(2, SPLIT_L)
    dy = jnp.asarray(np.random.default_rng(34).standard_normal((2, SPLIT_L, 8)), jnp.float32)
    ds = jnp.asarray(np.random.default_rng(35).standard_normal((2, 8, 4)), jnp.float32)

    def run(fn, x, cot_dtype):
        @jax.jit
        def go(x):
            (y, s), vjp = jax.vjp(lambda a: fn(**a, delta_softplus=True, segment_ids=seg), x)
            return y, s, vjp((dy.astype(cot_dtype), ds))[0]
        return go(x)

    fn = functools.partial(selective_scan_pallas_gpu, interpret=True, config=cfg)
    y16, s16, g16 = run(fn, x16, jnp.bfloat16)
    y32, s32, g32 = run(selective_scan_reference, x32, jnp.float32)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_l2(y16.astype(jnp.float32), y32) < 1e-2
    assert rel_l2(s16, s32) < 1e-5
    for name in x16:
        assert g16[name].dtype == jnp.bfloat16, name
        assert rel_l2(g16[name].astype(jnp.float32), g32[name]) < 1e-2, name


@pytest.mark.parametrize("splits", [(2, 2), (4, 3), (1, 1)])
def test_gpu_split_kernels_lower_for_cuda(splits):
    """The Triton lowering (run on the CPU by lowering for "cuda") accepts every kernel of
    the differentiated call: splits of one and several programs, a tail, all options.
    The interpreter does not exercise it (e.g. a cond on a constant fails only here)."""
    b, l, d, n = 2, 203, 64, 16                      # 12 chunks of 16 + a tail of 11
    T, f32 = jax.ShapeDtypeStruct, jnp.float32
    x = dict(u=T((b, l, d), jnp.bfloat16), delta=T((b, l, d), jnp.bfloat16), A=T((d, n), f32),
             B=T((b, l, n), f32), C=T((b, l, n), f32), D=T((d,), f32),
             z=T((b, l, d), jnp.bfloat16), delta_bias=T((d,), f32), initial_state=T((b, d, n), f32))
    cfg = GpuConfig(seq_splits=splits[0], bwd_seq_splits=splits[1])

    def f(x, seg, dy):
        (y, s), vjp = jax.vjp(lambda a: selective_scan_pallas_gpu(
            **a, delta_softplus=True, segment_ids=seg, config=cfg), x)
        return vjp((dy, s))[0]

    with cuda_target():
        text = jax.jit(f).trace(x, T((b, l), jnp.int32), T((b, l, d), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
    kernels = 2 + (splits[0] > 1) + (splits[1] > 1)   # + the split-state kernels
    assert text.count("__gpu$xla.gpu.triton") == kernels
    # exp2, multiply-add and the gate's reciprocal go in as inline PTX (the interpreter runs
    # their jax.numpy fallbacks instead, so only the GPU benchmark's float32 check runs them)
    for ptx in ("ex2.approx.ftz.f32", "fma.rn.f32", "rcp.approx.ftz.f32"):
        assert ptx in text, ptx


def test_gpu_fast_softplus_and_sigmoid_match_float64():
    """The GPU kernels' softplus (a polynomial log1p) and sigmoid, as the interpreter runs
    them, against float64 over every range delta and z take, the tiny-e tail included."""
    from pallas_kernels.selective_scan import pallas_gpu as pg
    from pallas_kernels.selective_scan.pallas_common import LOG1P_COEFFS
    x = np.concatenate([np.linspace(-40.0, 40.0, 200_001),
                        np.random.default_rng(0).standard_normal(10_000) * 3]).astype(np.float32)
    x64 = x.astype(np.float64)
    # e^x as 2^(x log2 e) inherits the float32 roundings of log2 e and of the product: a
    # relative error growing as |x| 9e-8 (2e-6 at |x| = 22, where softplus(x) ~ 3e-10)
    bound = 3e-7 + 1e-7 * np.abs(x64)
    softplus = np.asarray(pg._softplus(jnp.asarray(x), interpret=True), np.float64)
    want = np.logaddexp(x64, 0.0)
    assert np.all(np.abs(softplus - want) / want < bound)
    sig = np.asarray(pg._sigmoid(jnp.asarray(x), interpret=True), np.float64)
    want = 1.0 / (1.0 + np.exp(-x64))
    assert np.all(np.abs(sig - want) / want < bound)
    e = np.linspace(0.0, 1.0, 100_001, dtype=np.float32)[1:]     # the polynomial alone
    p = np.float32(LOG1P_COEFFS[-1])
    for c in LOG1P_COEFFS[-2::-1]:
        p = p * e + np.float32(c)
    assert np.max(np.abs(e.astype(np.float64) * p / np.log1p(e.astype(np.float64)) - 1)) < 3e-7


def test_exp2_poly_matches_float64():
    """exp2_poly (2^x on multiply-add units) against float64 over its whole clamped range,
    jitted, so XLA gets the chance to fold the rounding trick away; and its clamps."""
    from pallas_kernels.selective_scan.pallas_common import exp2_poly
    x = np.concatenate([np.linspace(-126.0, 127.0, 1_000_001),
                        np.random.default_rng(1).uniform(-2, 2, 100_000)]).astype(np.float32)
    got = np.asarray(jax.jit(exp2_poly)(jnp.asarray(x)), np.float64)
    err = got / np.exp2(x.astype(np.float64)) - 1
    # no bias: a decay's error compounds along the sequence (2^0 was 1 + 1 ulp at first,
    # which put a 1.5e-6 error into a 203-step scan)
    assert np.max(np.abs(err)) < 3e-7 and abs(np.mean(err)) < 3e-8
    assert float(exp2_poly(jnp.zeros((), jnp.float32))) == 1.0
    edges = jnp.array([-np.inf, -300.0, -127.0, 300.0, np.inf], jnp.float32)
    assert np.asarray(jax.jit(exp2_poly)(edges)).tolist() == [0.0] * 3 + [2.0**127] * 2


def test_gpu_split_counts():
    """Requested splits round down to a divisor of l // chunk; the heuristic keeps the
    benchmark shapes unsplit at the default config and splits small grids."""
    from pallas_kernels.selective_scan.pallas_gpu import default_seq_splits, effective_splits
    assert [effective_splits(r, 8) for r in (1, 2, 3, 4, 5, 8, 64)] == [1, 2, 2, 4, 4, 8, 8]
    assert effective_splits(4, 0) == 1 and effective_splits(4, 9) == 3
    cfg = GpuConfig(chunk=8, seq_splits=4, bwd_seq_splits=3)
    assert default_seq_splits(2, SPLIT_L, 16, 2, cfg) == (4, 2)
    assert default_seq_splits(2, 4096, 8192) == (1, 1)      # Jamba-v0.1: 1024 warps
    assert default_seq_splits(8, 2048, 1536) == (1, 1)      # mamba-130m: 768 warps
    assert default_seq_splits(1, 4096, 8192) == (2, 2)      # 512 warps
    assert default_seq_splits(1, 100, 8) == (1, 1)          # too short: < 8 chunks per split


def test_public_api_dispatch():
    """impl="pallas" with interpret=True on CPU is the GPU kernel; without, a clear error."""
    x = make_inputs(15, l=10, groups=2)
    core = [x[k] for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan(*core, D=x["D"], impl="pallas", interpret=True)
    y_ref = selective_scan(*core, D=x["D"], impl="reference")
    assert rel_l2(y, y_ref) < 1e-5
    for impl in ("pallas_gpu", "pallas_tpu"):
        y, s = selective_scan(*core, impl=impl, interpret=True, return_final_state=True)
        y_ref, s_ref = selective_scan(*core, impl="reference", return_final_state=True)
        assert rel_l2(y, y_ref) < 1e-5 and rel_l2(s, s_ref) < 1e-5, impl
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r'impl="pallas" has no kernel .*interpret=True'):
            selective_scan(*core, impl="pallas")


def _largest_intermediate(fn, *args):
    import jax.extend.core

    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":   # the kernel body works on blocks
                sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars]
                continue
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                sizes.append(walk(sub))
        return max(sizes)
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_grad_keeps_per_step_states_on_chip(backend):
    """Nothing outside the kernels (kernel outputs included: checkpoints, partial sums) has
    b*l*d*n elements: per-step states never reach HBM."""
    b, l, d, n = 2, 256, 8, 32
    x = make_inputs(16, b=b, l=l, d=d, n=n)
    fn = {"gpu": functools.partial(selective_scan_pallas_gpu, interpret=True),
          "tpu": functools.partial(selective_scan_pallas_tpu, interpret=True)}[backend]
    loss = lambda *a: fn(*a, delta_softplus=True)[0].sum()
    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    assert _largest_intermediate(grad, *args) <= b * l * d * n // 8


_SHARD_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pallas_kernels.selective_scan import selective_scan
    from tests.test_selective_scan import make_inputs, segments_from_starts
    from tests.test_selective_scan_pallas import GPU_CFG, TPU_CFG
    from pallas_kernels.selective_scan.pallas_gpu import selective_scan_pallas_gpu
    from pallas_kernels.selective_scan.pallas_tpu import selective_scan_pallas_tpu
    from tests.helpers import rel_l2

    assert jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    x = make_inputs(17, b=4, l=19, d=16, n=4)
    seg = segments_from_starts(4, 19, [7])
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    spec = dict(u=P("data", None, "model"), delta=P("data", None, "model"), A=P("model"),
                B=P("data"), C=P("data"), D=P("model"), z=P("data", None, "model"),
                delta_bias=P("model"), initial_state=P("data", "model"))
    out_specs = (P("data", None, "model"), P("data", "model"))
    kernels = dict(
        gpu=functools.partial(selective_scan_pallas_gpu, interpret=True, config=GPU_CFG),
        tpu=functools.partial(selective_scan_pallas_tpu, interpret=True, config=TPU_CFG),
        reference=functools.partial(selective_scan, impl="reference", return_final_state=True))

    def loss_and_grads(fn, sharded, check_vma=True):
        def f(a, seg):
            return fn(**a, segment_ids=seg, delta_softplus=True)
        a, s = {k: x[k] for k in names}, seg
        if sharded:
            f = jax.shard_map(f, mesh=mesh, in_specs=(spec, P("data")), out_specs=out_specs,
                              check_vma=check_vma)
            a = {k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in a.items()}
            s = jax.device_put(s, NamedSharding(mesh, P("data")))
        def loss(a, s):
            y, final = f(a, s)
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(final * final), (y, final)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(a, s)

    (_, (y_ref, s_ref)), g_ref = loss_and_grads(kernels["reference"], False)
    errors = {}
    # The TPU interpreter runs under check_vma (the kernels declare how their outputs vary
    # and sum the cotangents of replicated inputs); Pallas' generic interpreter, used for
    # the Triton kernels, cannot evaluate a kernel body under check_vma.
    for name, check_vma in (("gpu", False), ("tpu", True)):
        (_, (y, s)), g = loss_and_grads(kernels[name], True, check_vma)
        errors[name] = dict(y=rel_l2(y, y_ref), s=rel_l2(s, s_ref),
                            **{k: rel_l2(g[k], g_ref[k]) for k in names})
    print(json.dumps(errors))
""")


def test_inside_shard_map_over_batch_and_channels():
    """4 forced host devices, mesh (data=2, model=2): batch and channels sharded."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend, errs in errors.items():
        for name, err in errs.items():
            assert err < 1e-5, (backend, name, err)
