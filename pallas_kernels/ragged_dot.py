"""Grouped matmul for mixture-of-experts layers: ``jax.lax.ragged_dot``'s contract, with JAX's own Pallas
Mosaic GPU kernels on Hopper.

``ragged_dot(x, w, group_sizes)``: ``x`` ``(m, k)`` rows sorted by group, ``w`` ``(g, k, n)``, group ``i``
owns the next ``group_sizes[i]`` rows and multiplies them by ``w[i]``; rows past ``sum(group_sizes)``
give zeros. Why not only ``jax.lax.ragged_dot``: XLA's GPU backend (jax 0.11) lowers it by dense
expansion, every group's matrix on every row, so an 8-expert top-2 layer does 8x its FLOPs, which left
it slower than computing every expert on every token (``BENCHMARKS.md``, MoE section).

``impl``:

* ``"xla"``: ``jax.lax.ragged_dot`` (the reference; what TPUs and CPUs run: XLA TPU lowers it natively);
* ``"mosaic_gpu"``: three kernels of ``jax.experimental.pallas.ops.gpu``, under a ``custom_vjp``: the
  forward and the input gradient are ``ragged_dot_mgpu.ragged_dot`` (the second with ``transpose_rhs``:
  ``dx = dy w[i]^T`` without materialising the transpose), the weight gradient is
  ``transposed_ragged_dot_mgpu.transposed_ragged_dot`` (``dw[i] = x_i^T dy_i``, ragged along the
  contraction). Those kernels leave rows past ``sum(group_sizes)`` unwritten, so they are zeroed here,
  and take a row count below 8 or a multiple of 8, so rows are padded.
  Hopper (sm_90) only, bf16 or f16 operands of one dtype, dimensions multiples of the blocks;
* ``"auto"``: ``"mosaic_gpu"`` where it applies, else ``"xla"``.

The Mosaic GPU kernels have no CPU interpreter: the CPU tests check the ``custom_vjp`` around them with
reference kernels (``jax.lax.ragged_dot_general`` with the same contracts, unwritten rows as NaN), and
``benchmarks/moe.py`` checks the real kernels against ``jax.lax.ragged_dot`` on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla", "mosaic_gpu"]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of the Mosaic GPU kernels (``block_k`` divides the contracted dimension of the forward
    and the input gradient; ``block_m`` / ``block_n`` divide the weight gradient's ``k`` / ``n``)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 6
    grid_block_n: int = 2


DEFAULT_BLOCKS = Blocks()
ROW_TILE = 8  # the Mosaic GPU kernels take a row count below 8 or a multiple of it


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The three grouped products, by contract (``gs``: group sizes):

    ``forward(x (m, k), w (g, k, n), gs) -> (m, n)``; ``input_grad(dy (m, n), w (g, k, n), gs) -> (m, k)``
    (``dy w[i]^T``); ``weight_grad(x (m, k), dy (m, n), gs) -> (g, k, n)`` (``x_i^T dy_i``). Rows past
    ``sum(gs)`` of the first two may hold anything."""
    forward: Callable
    input_grad: Callable
    weight_grad: Callable


def _mosaic_gpu_kernels(blocks: Blocks) -> Kernels:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu  # noqa: PLC0415

    tiles = dataclasses.asdict(blocks)
    return Kernels(
        forward=lambda x, w, gs: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=gs, **tiles),
        input_grad=lambda dy, w, gs: ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=gs, transpose_rhs=True, **tiles),
        weight_grad=lambda x, dy, gs: transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=gs, **tiles),
    )


def reference_kernels() -> Kernels:
    """``jax.lax.ragged_dot_general`` with the contracts of `Kernels` (what the CPU tests run)."""
    dims = jax.lax.RaggedDotDimensionNumbers
    return Kernels(
        forward=lambda x, w, gs: jax.lax.ragged_dot(x, w, gs),
        input_grad=lambda dy, w, gs: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), gs),
        weight_grad=lambda x, dy, gs: jax.lax.ragged_dot_general(
            x, dy, gs, dims(dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
                            rhs_group_dimensions=[])),
    )


def _rows_in_groups(rows: int, group_sizes: jax.Array) -> jax.Array:
    """(rows, 1) bool: the row belongs to some group."""
    return (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]


def _pad_rows(a: jax.Array, tile: int) -> jax.Array:
    pad = -a.shape[0] % tile
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def grouped_vjp(kernels: Kernels, row_tile: int = 1):
    """``ragged_dot(x, w, group_sizes)`` differentiable through ``kernels``, whose operands get their rows
    padded to a multiple of ``row_tile`` (padded rows fall past the groups) and whose rows past the groups
    are zeroed."""

    @jax.custom_vjp
    def f(x, w, group_sizes):
        m = x.shape[0]
        y = kernels.forward(_pad_rows(x, row_tile), w, group_sizes)[:m]
        return jnp.where(_rows_in_groups(m, group_sizes), y, 0)

    def fwd(x, w, group_sizes):
        return f(x, w, group_sizes), (x, w, group_sizes)

    def bwd(res, dy):
        x, w, group_sizes = res
        m = x.shape[0]
        inside = _rows_in_groups(m, group_sizes)
        dy = _pad_rows(jnp.where(inside, dy, 0).astype(x.dtype), row_tile)
        dx = jnp.where(inside, kernels.input_grad(dy, w, group_sizes)[:m], 0).astype(x.dtype)
        dw = kernels.weight_grad(_pad_rows(x, row_tile), dy, group_sizes).astype(w.dtype)
        return dx, dw, None

    f.defvjp(fwd, bwd)
    return f


@functools.cache
def _mosaic_gpu_ragged_dot(blocks: Blocks):
    return grouped_vjp(_mosaic_gpu_kernels(blocks), row_tile=ROW_TILE)


def mosaic_gpu_applies(x: jax.Array, w: jax.Array, blocks: Blocks = DEFAULT_BLOCKS) -> bool:
    """Whether the Mosaic GPU kernels take these operands on this machine (any row count: `ragged_dot`
    pads the rows to a multiple of 8)."""
    device = jax.devices()[0]
    if device.platform != "gpu" or getattr(device, "compute_capability", None) != "9.0":
        return False
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    _, k, n = w.shape
    out_tile = blocks.block_n * blocks.grid_block_n
    forward = k % blocks.block_k == 0 and n % out_tile == 0             # (m, k) x (k, n)
    input_grad = n % blocks.block_k == 0 and k % out_tile == 0          # (m, n) x (n, k)
    weight_grad = k % blocks.block_m == 0 and n % blocks.block_n == 0   # (k, m) x (m, n), ragged m
    return forward and input_grad and weight_grad


def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: Impl = "auto",
               blocks: Blocks = DEFAULT_BLOCKS) -> jax.Array:
    """``x`` ``(m, k)`` sorted by group, ``w`` ``(g, k, n)``, ``group_sizes`` ``(g,)`` int32 -> ``(m, n)``
    in ``x``'s dtype (see the module docstring)."""
    if impl == "auto":
        impl = "mosaic_gpu" if mosaic_gpu_applies(x, w, blocks) else "xla"
    if impl == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if impl == "mosaic_gpu":
        return _mosaic_gpu_ragged_dot(blocks)(x, w, group_sizes.astype(jnp.int32))
    raise ValueError(f"impl must be 'auto', 'xla' or 'mosaic_gpu', got {impl!r}")
