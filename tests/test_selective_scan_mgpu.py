"""The Mosaic GPU forward prototype (``pallas_mgpu``) in JAX's Mosaic GPU interpreter (TMA
copies, barriers and shared memory simulated) against the sequential reference, and its
lowering for CUDA."""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.cross_lowering import cuda_target
from pallas_kernels.selective_scan import selective_scan_reference
from pallas_kernels.selective_scan.pallas_mgpu import selective_scan_fwd_mgpu
from tests.helpers import rel_l2
from tests.test_selective_scan import make_inputs, segments_from_starts

CASES = {
    "all_options": dict(softplus=True, segments=True, keys=("D", "z", "delta_bias", "initial_state")),
    "plain": dict(softplus=False, segments=False, keys=()),
    "groups": dict(softplus=True, segments=False, keys=("D", "z"), groups=2),
    # half the decays on the multiply-add units, the tile loop unrolled by 4
    "poly_exp_unrolled": dict(softplus=True, segments=True, keys=("D", "z", "initial_state"),
                              poly_exp=8, unroll=4),
    "all_poly_exp": dict(softplus=False, segments=True, keys=("z",), poly_exp=16, unroll=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case):
    c = CASES[case]
    b, l, d, n = 2, 37, 256, 16                 # 37 = 2 tiles of 16 + a tail of 5
    x = make_inputs(3, b=b, l=l, d=d, n=n, groups=c.get("groups"))
    kw = {k: x[k] for k in c["keys"]}
    seg = segments_from_starts(b, l, [9, 22]) if c["segments"] else None
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    y, s = selective_scan_fwd_mgpu(*args, **kw, delta_softplus=c["softplus"],
                                   segment_ids=seg, interpret=True,
                                   poly_exp=c.get("poly_exp", 0), unroll=c.get("unroll", 1))
    y0, s0 = selective_scan_reference(*args, **kw, delta_softplus=c["softplus"],
                                      segment_ids=seg)
    assert rel_l2(y, y0) < 1e-5 and rel_l2(s, s0) < 1e-5


@pytest.mark.parametrize("block_l,ckpt_every", [(16, 16), (32, 16), (16, 8), (16, None)])
def test_checkpoints_are_entry_states(block_l, ckpt_every):
    """The state entering every ckpt_every steps, also several per tile, none past l."""
    b, l, d, n = 1, 40, 128, 4
    x = make_inputs(5, b=b, l=l, d=d, n=n)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    out = selective_scan_fwd_mgpu(*args, initial_state=x["initial_state"], block_l=block_l,
                                  ckpt_every=ckpt_every, interpret=True)
    if ckpt_every is None:
        assert len(out) == 2
        return
    ck = out[2]
    starts = range(0, l, ckpt_every)
    assert ck.shape == (b, len(starts), n, d)
    for k, t in enumerate(starts):
        if t == 0:
            want = x["initial_state"]
        else:
            _, want = selective_scan_reference(*(a[:, :t] if a.ndim == 3 and a.shape[1] == l
                                                 else a for a in args),
                                               initial_state=x["initial_state"],
                                               )
        assert rel_l2(jnp.swapaxes(ck[:, k], 1, 2), want) < 1e-5, t


def test_lowers_for_cuda():
    b, l, d, n = 2, 203, 256, 16
    T, f32 = jax.ShapeDtypeStruct, jnp.float32
    x = dict(u=T((b, l, d), jnp.bfloat16), delta=T((b, l, d), jnp.bfloat16), A=T((d, n), f32),
             B=T((b, l, n), f32), C=T((b, l, n), f32), D=T((d,), f32),
             z=T((b, l, d), jnp.bfloat16), delta_bias=T((d,), f32),
             initial_state=T((b, d, n), f32))
    f = lambda x, seg: selective_scan_fwd_mgpu(**x, delta_softplus=True, segment_ids=seg,
                                               ckpt_every=16, poly_exp=4, unroll=16)
    with cuda_target():
        text = jax.jit(f).trace(x, T((b, l), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_options_raise():
    x = make_inputs(3, b=1, l=20, d=128, n=4)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="poly_exp"):
        selective_scan_fwd_mgpu(*args, poly_exp=5, interpret=True)
    with pytest.raises(ValueError, match="unroll"):
        selective_scan_fwd_mgpu(*args, unroll=3, interpret=True)
    with pytest.raises(ValueError, match="ckpt_every"):
        selective_scan_fwd_mgpu(*args, block_l=16, ckpt_every=32, interpret=True)
    from pallas_kernels.selective_scan.pallas_gpu import GpuConfig
    for bad in (dict(mgpu_unroll=3), dict(mgpu_stages=0), dict(mgpu_poly_exp=-1),
                dict(mgpu_block_l=8), dict(mgpu_block_l=24)):
        with pytest.raises(ValueError, match="mgpu_"):
            GpuConfig(forward="mgpu", **bad)


def test_bf16_inputs():
    b, l, d, n = 1, 37, 128, 16
    x = make_inputs(4, b=b, l=l, d=d, n=n)
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    lo = {k: x[k].astype(jnp.bfloat16) for k in ("u", "delta", "z")}
    y, s = selective_scan_fwd_mgpu(lo["u"], lo["delta"], x["A"], x["B"], x["C"], z=lo["z"],
                                   **kw, interpret=True)
    y0, s0 = selective_scan_reference(*(lo[k].astype(jnp.float32) for k in ("u", "delta")),
                                      x["A"], x["B"], x["C"], z=lo["z"].astype(jnp.float32), **kw)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_l2(y.astype(jnp.float32), y0) < 1e-2 and rel_l2(s, s0) < 1e-5


@pytest.mark.parametrize("block_l", [16, 32])
def test_gpu_backend_with_mgpu_forward_values_and_grads(block_l):
    """GpuConfig(forward="mgpu"): the Mosaic GPU forward's checkpoints (every chunk = 16
    steps, one or two per tile) feed the Triton backward (both in their interpreters); values
    and every gradient against the reference."""
    from pallas_kernels.selective_scan.pallas_gpu import GpuConfig, selective_scan_pallas_gpu
    b, l, d, n = 1, 37, 128, 16
    x = make_inputs(6, b=b, l=l, d=d, n=n)
    seg = segments_from_starts(b, l, [20])
    cot = make_inputs(7, b=b, l=l, d=d, n=n)

    def run(fn):
        def f(x):
            (y, s), vjp = jax.vjp(lambda a: fn(**a, delta_softplus=True, segment_ids=seg), x)
            return y, s, vjp((cot["u"], cot["initial_state"]))[0]
        return jax.jit(f)(x)

    y, s, g = run(lambda **k: selective_scan_pallas_gpu(
        **k, interpret=True, config=GpuConfig(forward="mgpu", mgpu_stages=3, mgpu_poly_exp=4,
                                              mgpu_unroll=4, mgpu_block_l=block_l)))
    y0, s0, g0 = run(selective_scan_reference)
    assert rel_l2(y, y0) < 1e-5 and rel_l2(s, s0) < 1e-5
    for k in x:
        assert rel_l2(g[k], g0[k]) < 1e-5, k


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_backend_with_mgpu_forward_lowers_for_cuda(dtype):
    """Forward (Mosaic GPU) and backward (Triton) of one differentiated call with segments,
    lowered for CUDA (Mosaic GPU checks the shared memory it needs while lowering)."""
    from pallas_kernels.selective_scan.pallas_gpu import GpuConfig, selective_scan_pallas_gpu
    b, l, d, n = 2, 203, 256, 16
    T, f32 = jax.ShapeDtypeStruct, jnp.float32
    x = dict(u=T((b, l, d), dtype), delta=T((b, l, d), dtype), A=T((d, n), f32),
             B=T((b, l, n), f32), C=T((b, l, n), f32), D=T((d,), f32),
             z=T((b, l, d), dtype), delta_bias=T((d,), f32))

    def f(x, dy, seg):
        (y, s), vjp = jax.vjp(lambda a: selective_scan_pallas_gpu(
            **a, delta_softplus=True, segment_ids=seg, config=GpuConfig(forward="mgpu")), x)
        return vjp((dy, s))[0]

    with cuda_target():
        text = jax.jit(f).trace(x, T((b, l, d), dtype), T((b, l), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and text.count("__gpu$xla.gpu.triton") == 1


def test_auto_forward_picks_mosaic_gpu_on_hopper_only(monkeypatch):
    """forward="auto": Mosaic GPU on compute capability >= 9.0 when channels per group are a
    multiple of 128 and the programs (b * d / 128) fill at least half the SMs; Triton on older
    GPUs, for other widths, for few programs, and in interpret mode."""
    from pallas_kernels.selective_scan import pallas_gpu
    cfg = pallas_gpu.GpuConfig(forward="auto")
    monkeypatch.setattr(pallas_gpu, "num_sms", lambda: 132)
    for cc, (b, d, g), interpret, want in [((9, 0), (2, 8192, 1), False, "mgpu"),
                                           ((10, 0), (8, 1536, 1), False, "mgpu"),
                                           ((9, 0), (8, 1536, 2), False, "mgpu"),
                                           ((9, 0), (8, 1536, 8), False, "triton"),
                                           ((9, 0), (1, 4096, 1), False, "triton"),
                                           ((9, 0), (2, 8192, 1), True, "triton"),
                                           ((8, 0), (2, 8192, 1), False, "triton"),
                                           (None, (2, 8192, 1), False, "triton")]:
        monkeypatch.setattr(pallas_gpu, "compute_capability", lambda: cc)
        assert pallas_gpu.resolve_forward(cfg, b, d, g, interpret).forward == want, (cc, b, d, g)
    explicit = pallas_gpu.GpuConfig(forward="triton")
    assert pallas_gpu.resolve_forward(explicit, 2, 8192, 1, False) is explicit


def test_shared_memory_fits_or_falls_back(monkeypatch):
    """The Mosaic GPU tile shrinks by chunks to fit shared memory (float32 inputs, segments,
    checkpoints) and to the sequence; "auto" falls back to Triton when not even one chunk
    fits, an explicit "mgpu" says so, and forward_arrays refuses a tile that does not fit."""
    from pallas_kernels.selective_scan import pallas_gpu
    from pallas_kernels.selective_scan.pallas_mgpu import SMEM_BYTES, smem_bytes
    cfg = pallas_gpu.GpuConfig(forward="mgpu")
    kw = dict(has_keep=True, consts_rows=2)
    assert pallas_gpu.mgpu_tile(cfg, 4096, 16, [2, 2, 2], 2, has_keep=False, consts_rows=2) == (64, 16)
    K, n_pad = pallas_gpu.mgpu_tile(cfg, 4096, 16, [4, 4, 4], 4, **kw)
    assert K < 64 and K % 16 == 0 and n_pad == 16
    assert smem_bytes(K, 16, [4, 4, 4], 4, has_keep=True, consts_rows=18, ckpt_every=16,
                      stages=2) <= SMEM_BYTES
    assert smem_bytes(K + 16, 16, [4, 4, 4], 4, has_keep=True, consts_rows=18, ckpt_every=16,
                      stages=2) > SMEM_BYTES
    assert pallas_gpu.mgpu_tile(cfg, 20, 16, [2, 2, 2], 2, **kw) == (32, 16)   # l rounded up
    assert pallas_gpu.mgpu_tile(cfg, 4096, 512, [4, 4, 4], 4, **kw) is None

    # too wide a state for one chunk: explicit "mgpu" raises, "auto" runs Triton
    monkeypatch.setattr(pallas_gpu, "compute_capability", lambda: (9, 0))
    monkeypatch.setattr(pallas_gpu, "num_sms", lambda: 2)
    x = make_inputs(8, b=1, l=16, d=128, n=512)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="shared memory"):
        pallas_gpu.selective_scan_pallas_gpu(*args, config=cfg)
    auto = jax.eval_shape(lambda *a: pallas_gpu.selective_scan_pallas_gpu(*a), *args)
    assert auto[0].shape == x["u"].shape
    from pallas_kernels.selective_scan.pallas_mgpu import selective_scan_fwd_mgpu
    with pytest.raises(ValueError, match="shared memory"):
        selective_scan_fwd_mgpu(*args, block_l=16, interpret=True)
