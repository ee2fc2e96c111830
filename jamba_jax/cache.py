"""Inference caches: what a cached decode step needs from the past, as a pytree.

Per sublayer of the stored *period* (the stack runs as ``lax.scan`` over repetitions of one period,
so every cache array carries the same leading ``repeats`` axis as the parameters):

* Mamba-1 / Mamba-2 -> `SSMCache`: ``conv (repeats, b, d_conv - 1, conv_dim)`` in the activation
  dtype (the last ``d_conv - 1`` inputs of the causal conv, oldest first) and ``ssm`` in
  ``state_dtype`` (float32 unless asked otherwise, see below):
  Mamba-2 ``(repeats, b, n_heads, head_dim, d_state)``, Mamba-1 ``(repeats, b, d_inner, d_state)``.
* attention -> `KVCache`: ``k, v (repeats, b, max_len, n_kv_heads, head_dim)`` preallocated, in the
  activation dtype, keys already rotated (RoPE). Slot ``j`` of row ``i`` is valid iff
  ``j < lengths[i]``; anything at or after ``lengths[i]`` is stale and never read.
* MLP / MoE -> ``None`` (no state).

`Cache` holds the per-period tuple and ``lengths (b,)`` int32: how many tokens each row has consumed,
which is the position of the next token (RoPE) and the KV slot it is written to. Every attention
layer of a row has seen the same tokens, so one ``lengths`` serves them all. The token loop holds the
same cache *unstacked* (`unstack_cache`): one entry per layer, ``r * period + j``, without the
repeats axis.

SSM state dtype (``state_dtype``): float32 by default, the project's rule for SSM state. bfloat16 is
the inference-only alternative, the same choice as mamba_ssm's inference cache (its
``selective_state_update`` reads and writes a bf16 state when the model runs in bf16). It halves the
state's memory and, more to the point, the bytes a decode step moves: at large batch a Mamba decode
step is bandwidth bound on reading and writing the state (Mamba-2 2.7B at batch 64: 64 layers x 64
rows x 80 x 64 x 128 = 10.7 GB in float32, 5.4 GB in bfloat16, against 5.4 GB of bf16 weights). The
recurrence itself is always computed in float32; only the stored state is rounded (round to nearest
even), once per step. Prefill computes in float32 and rounds its final state once.

The single-token conv helpers used by both Mamba mixers live here too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: SSM state dtypes a cache may hold (see the module docstring).
STATE_DTYPES = ("float32", "bfloat16")


def check_state_dtype(state_dtype) -> np.dtype:
    """``state_dtype`` as a dtype, if it is float32 or bfloat16 (a dtype, a scalar type or its name).

    Raises ``ValueError`` for anything else: float16 would overflow / underflow the state, and
    wider types buy nothing over the float32 arithmetic the update already uses.
    """
    try:
        dtype = jnp.dtype(state_dtype) if state_dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SSMCache:
    """A Mamba layer's state: conv window ``(..., b, k-1, c)`` (activation dtype) and SSM state
    (``state_dtype``: float32 by default, bfloat16 on request)."""

    conv: jax.Array
    ssm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """An attention layer's keys and values ``(..., b, max_len, n_kv_heads, head_dim)``."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """The whole model's cache: one entry per sublayer of the period (``None`` for MLP / MoE),
    stacked over repetitions (or, unstacked, one per layer), and the per-row token counts
    ``lengths (b,)`` int32."""

    layers: tuple[Any, ...]
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int | None:
        """KV capacity (``None`` for a model without attention: SSM state does not grow)."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[-3]  # (..., b, max_len, n_kv_heads, head_dim), stacked or not
        return None


def layer_cache_shapes(kind: str, sub_cfg, batch: int, max_len: int, dtype, state_dtype=jnp.float32) -> Any:
    """`jax.ShapeDtypeStruct` cache of one sublayer (no repeats axis); ``None`` for MLP / MoE."""
    sds = jax.ShapeDtypeStruct
    state_dtype = check_state_dtype(state_dtype)
    if kind == "mamba2":
        c = sub_cfg
        return SSMCache(sds((batch, c.d_conv - 1, c.conv_dim), dtype),
                        sds((batch, c.n_heads, c.head_dim, c.d_state), state_dtype))
    if kind == "mamba1":
        c = sub_cfg
        return SSMCache(sds((batch, c.d_conv - 1, c.d_inner), dtype), sds((batch, c.d_inner, c.d_state), state_dtype))
    if kind == "attention":
        c = sub_cfg
        shape = (batch, max_len, c.n_kv_heads, c.head_dim)
        return KVCache(sds(shape, dtype), sds(shape, dtype))
    return None


def cache_shapes(cfg, batch: int, max_len: int, dtype=jnp.float32, state_dtype=jnp.float32) -> Cache:
    """The `Cache` of a `ModelConfig` as shape/dtype structs (leading repeats axis included).

    ``dtype``: the activation dtype (conv windows, keys and values); ``state_dtype``: the SSM
    state's, float32 (default) or bfloat16 (see the module docstring; ``ValueError`` otherwise).
    """
    period = cfg.period
    repeats = cfg.n_layers // period

    def stack(s):
        return jax.ShapeDtypeStruct((repeats, *s.shape), s.dtype)

    layers = tuple(jax.tree.map(stack, layer_cache_shapes(kind, getattr(cfg, kind), batch, max_len, dtype,
                                                          state_dtype))
                   for kind in cfg.layers[:period])
    return Cache(layers, jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32, state_dtype=jnp.float32) -> Cache:
    """An empty cache (zeros, ``lengths = 0``): decoding from it is generating from no prompt.
    Arguments as `cache_shapes`."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len, dtype, state_dtype))


def cache_bytes(cfg, batch: int, max_len: int, dtype=jnp.float32, state_dtype=jnp.float32) -> dict[str, int]:
    """Bytes of the cache by part: ``{"ssm", "conv", "kv"}`` (arguments as `cache_shapes`).

    E.g. Mamba-2 2.7B at batch 64: ``ssm`` is 10.7e9 in float32, 5.4e9 in bfloat16.
    """
    out = {"ssm": 0, "conv": 0, "kv": 0}
    for layer in cache_shapes(cfg, batch, max_len, dtype, state_dtype).layers:
        if isinstance(layer, SSMCache):
            out["ssm"] += layer.ssm.size * layer.ssm.dtype.itemsize
            out["conv"] += layer.conv.size * layer.conv.dtype.itemsize
        elif isinstance(layer, KVCache):
            out["kv"] += 2 * layer.k.size * layer.k.dtype.itemsize
    return out


def unstack_cache(cache: Cache, repeats: int) -> Cache:
    """The same cache with one entry per layer, without the leading repeats axis: entry
    ``r * period + j`` is repetition ``r`` of sublayer ``j``. The token loop's form: each layer's
    state is then a buffer of its own, updated in place as the loop carry, with no stacked array
    to slice (see `jamba_jax.generate.layer_weights`)."""
    return Cache(tuple(jax.tree.map(lambda a: a[r], layer) for r in range(repeats) for layer in cache.layers),
                 cache.lengths)


def stack_cache(cache: Cache, period: int) -> Cache:
    """Inverse of `unstack_cache`: ``period`` entries, each stacked over repetitions."""
    flat = cache.layers
    return Cache(tuple(jax.tree.map(lambda *a: jnp.stack(a), *flat[j::period]) for j in range(period)),
                 cache.lengths)


# --------------------------------------------------------------------------------- conv helpers

def conv_window(x: jax.Array, lengths: jax.Array, k: int) -> jax.Array:
    """The causal conv's streaming window after each row's token ``lengths[i] - 1``.

    x ``(b, l, c)`` the conv inputs of a right-padded batch (real tokens at ``t < lengths[i]``).
    Returns ``(b, k-1, c)``: inputs ``lengths[i] - k + 1 .. lengths[i] - 1``, zeros before position 0.
    """
    b, l, c = x.shape
    xp = jnp.concatenate([jnp.zeros((b, k - 1, c), x.dtype), x], axis=1)  # index t + k - 1 holds x[t]
    return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, k - 1, axis=0))(xp, lengths)


def conv_step(window: jax.Array, x: jax.Array, weight: jax.Array, bias: jax.Array | None):
    """One step of the causal depthwise conv (``jamba_jax.ops.causal_conv1d`` semantics).

    window ``(b, k-1, c)``, x ``(b, c)``, weight ``(k, c)`` (tap ``k-1`` on the current input), bias
    ``(c,)``. Returns ``y (b, c)`` in ``x.dtype`` (accumulated in float32) and the new window.
    """
    full = jnp.concatenate([window.astype(x.dtype), x[:, None]], axis=1)  # (b, k, c)
    y = jnp.sum(full.astype(jnp.float32) * weight.astype(jnp.float32), axis=1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), full[:, 1:]


# ------------------------------------------------------------------------------------ diagnostics

_HLO_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_HLO_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w-]+)\((.*)$")


def cache_copies_in_loop(hlo_text: str, cache) -> list[str]:
    """Instructions of a compiled token loop (the body of each ``while`` in ``hlo_text``, e.g.
    ``jax.jit(f).lower(...).compile().as_text()``) that copy an SSM state or KV cache array, stacked
    or one layer's, or that write a whole stacked one other than by an in-place dynamic-update-slice
    or scatter. ``cache``: the `Cache` (or its `cache_shapes`). ``[]`` is the goal: a decode step
    then moves each layer's state once in and once out.

    Conv windows are left out: a few rows that the window's shift rewrites whole anyway.
    """
    leaves = [a for layer in cache.layers if layer is not None
              for a in ((layer.ssm,) if isinstance(layer, SSMCache) else (layer.k, layer.v))]
    key = lambda dtype, shape: (_HLO_DTYPES.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name),
                                ",".join(map(str, shape)))
    stacked = {key(a.dtype, a.shape) for a in leaves}
    per_layer = {key(a.dtype, a.shape[1:]) for a in leaves}
    bodies = set(re.findall(r"body=(%[\w.-]+)", hlo_text))
    if not bodies:
        raise ValueError("cache_copies_in_loop: no while loop in the HLO text (not a compiled token loop?)")
    comps: dict = {}
    comp, listed = None, []
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation header (or "}")
            comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0] if line[0] == "%" else None
            comps[comp] = {}
            continue
        m = _HLO_INSTR.match(line)
        if m and comp:
            root, name, dtype, dims, opcode, rest = m.groups()
            comps[comp][name] = (opcode, rest)
            if root:
                comps[comp][None] = name
            listed.append((comp, name, dtype, dims, opcode, rest))

    def root_opcode(c):
        name = comps.get(c, {}).get(None)
        for _ in range(8):  # through bitcasts
            if name is None:
                break
            opcode, rest = comps[c][name]
            if opcode != "bitcast":
                return opcode
            ops = re.findall(r"%([\w.-]+)", rest)
            name = ops[0] if ops else None
        return "?"

    found = []
    for c, name, dtype, dims, opcode, rest in listed:
        if c not in bodies:
            continue
        called = re.search(r"calls=(%[\w.-]+)", rest)
        if "copy" in opcode and (dtype, dims) in stacked | per_layer:
            found.append(f"%{name} = {dtype}[{dims}] {opcode}")
        elif (dtype, dims) in stacked and opcode == "fusion":
            root = root_opcode(called.group(1) if called else None)
            if root not in ("dynamic-update-slice", "scatter"):
                found.append(f"%{name} = {dtype}[{dims}] fusion (root {root})")
    return found
