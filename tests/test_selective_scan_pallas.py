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
