"""Cached autoregressive generation: prefill, one-token decode steps, sampling, `generate`, a CLI.

Model-level inference path (pure functions of a `LanguageModel`, usable under ``jax.jit``):

* `prefill` runs the chunked path (SSD / selective scan / causal conv with final states, causal
  attention) over a right-padded prompt batch and returns each row's next-token logits and a
  `jamba_jax.cache.Cache` holding the state after each row's own last prompt token.
* `decode_step` consumes one token per row through the single-step recurrences, the layers
  unrolled. The token loop of `generate` / `TokenStream` runs the same step on weights and cache
  taken apart by layer once (`layer_weights`, `jamba_jax.cache.unstack_cache`): each layer's state
  is then a loop buffer of its own, replaced in place (the SSM state by the fused kernel on GPUs,
  a KV slot by a scatter), and nothing is sliced or copied inside the loop.

Ragged batches: prompts are right-padded in ``input_ids`` and ``prompt_lengths`` says where each row
ends. Causality keeps real tokens from seeing the padding after them; the SSM layers get dt = 0 on
padding (decay 1, no input), so their final state is the one after the row's last real token; conv
windows are cut at each row's end; attention writes each row's next key at slot ``lengths[i]`` and
masks slots ``>= lengths[i]``. Every row therefore continues exactly as it would alone.

`generate` compiles once per (shapes, sampling options): prefill, the token loop
(``lax.while_loop``, exits early when every row has emitted ``eos_token_id``) and the output
assembly are one jitted function. `TokenStream` splits the same computation into a prefill call and
fixed-size decode segments so a host can print tokens as they come (the CLI does).

SSM state dtype: ``state_dtype`` (`prefill`, `generate`, `TokenStream`, ``--state-dtype``) is
float32 by default; bfloat16 halves the state's memory and the bytes a decode step must read and
write, which is what bounds a large-batch decode step (Mamba-2 2.7B at batch 64: 10.7 GB of float32
state against 5.4 GB of bf16 weights). mamba_ssm's inference cache makes the same choice. The
recurrence is still computed in float32; only the stored state is rounded, once per step.

CLI: ``python -m jamba_jax.generate --model DIR --prompt TEXT [--max-new-tokens N --temperature T
--top-k K --top-p P --seed S --dtype float32|bfloat16 --state-dtype float32|bfloat16]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jamba_jax.cache import Cache, check_state_dtype, stack_cache, unstack_cache

__all__ = ["generate", "prefill", "decode_step", "layer_weights", "sample", "TokenStream", "GenerationOptions", "load_model",
           "register_loader", "load_tokenizer", "main"]

_SSM_KINDS = ("mamba1", "mamba2")

# ``jamba_jax/__init__`` imports this module (to export `generate`), so ``python -m jamba_jax.generate``
# finds it in sys.modules before running it as __main__; runpy's warning about that is harmless here.
warnings.filterwarnings("ignore", message=r"'jamba_jax\.generate' found in sys\.modules", category=RuntimeWarning)


# ------------------------------------------------------------------------- model-level inference

def prefill(model, input_ids: jax.Array, prompt_lengths: jax.Array | None = None, *,
            max_len: int | None = None, state_dtype=jnp.float32) -> tuple[jax.Array, Cache]:
    """Run a prompt batch through the model and build the inference cache.

    Args:
      model: a `jamba_jax.LanguageModel`.
      input_ids: ``(b, l)`` int, prompts right-padded (the padding's value does not matter).
      prompt_lengths: ``(b,)`` int in ``[1, l]`` (default: all ``l``).
      max_len: KV-cache capacity in tokens (prompt + tokens to decode); default ``l``.
      state_dtype: dtype of the cached SSM states, float32 (default) or bfloat16 (half the bytes
        per decode step; ``ValueError`` otherwise). The scans run in float32 either way and the
        final states are rounded once.
    Returns:
      ``logits (b, vocab)`` float32 for the token after each row's last prompt token, and the
      `Cache` (``lengths = prompt_lengths``; shapes in `jamba_jax.cache`).
    """
    state_dtype = check_state_dtype(state_dtype)
    b, l = input_ids.shape
    max_len = l if max_len is None else max_len
    if max_len < l:
        raise ValueError(f"max_len ({max_len}) must be at least the prompt length ({l})")
    if not _is_traced(input_ids) and not _is_traced(prompt_lengths):   # under jit the caller checks
        _check_prompts(np.asarray(input_ids), prompt_lengths, model.config.vocab_size)
    lengths = (jnp.full((b,), l, jnp.int32) if prompt_lengths is None
               else jnp.asarray(prompt_lengths, jnp.int32))
    h = model.embed_tokens(input_ids)
    splits = [nnx.split(block) for block in model.blocks]

    def period_step(h, period_states):
        caches = []
        for (graphdef, _), state in zip(splits, period_states):
            block = nnx.merge(graphdef, state)
            x = block.norm(h)
            cache = None
            if block.kind in _SSM_KINDS:
                out, cache = block.mixer.prefill(x, lengths, state_dtype=state_dtype)
            elif block.kind == "attention":
                out, cache = block.mixer.prefill(x, max_len)
            elif block.kind == "moe":
                out, _ = block.mixer(x)
            else:
                out = block.mixer(x)
            h = block.add_to_residual(h, out)
            caches.append(cache)
        return h, tuple(caches)

    h, layers = jax.lax.scan(period_step, h, tuple(state for _, state in splits))
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (b, d_model)
    logits = model.logits(model.final_norm(last)).astype(jnp.float32)
    return logits, Cache(layers, lengths)


def layer_weights(model) -> list[list[nnx.State]]:
    """The model's parameters layer by layer: per repetition ``r`` of the period, per block of the
    period, the block's `nnx.State` holding entry ``r`` of each stacked array.

    The token loop takes them (and the cache, `unstack_cache`) apart once, before it starts, and
    each decode step reads every layer's weights where they lie. Sliced out of the stacked arrays
    inside the loop instead, each layer's matrices were copied before their matmul (XLA on GPU does
    not fuse a slice into a cuBLAS operand): on an H100 that tripled the weight traffic of a batch-1
    step. The price is a second copy of the weights while decoding (`TokenStream` keeps it).
    """
    states = [nnx.state(block) for block in model.blocks]
    return [[jax.tree.map(lambda a: a[r], state) for state in states] for r in range(model.repeats)]


def _decode_layers(model, tokens, cache: Cache, weights) -> tuple[jax.Array, Cache]:
    """One token through every layer, unrolled, on an unstacked cache (`unstack_cache`) with the
    per-layer `layer_weights`. Returns ``(logits (b, vocab) float32, the unstacked cache after)``."""
    h = model.embed_tokens(tokens[:, None])
    graphdefs = [nnx.graphdef(block) for block in model.blocks]
    layers = list(cache.layers)
    for r, period_states in enumerate(weights):
        for j, (graphdef, state) in enumerate(zip(graphdefs, period_states)):
            block = nnx.merge(graphdef, state)
            i = r * len(graphdefs) + j
            x = block.norm(h)
            if block.kind in _SSM_KINDS:
                out, layers[i] = block.mixer.decode_step(x, layers[i])
            elif block.kind == "attention":
                out, layers[i] = block.mixer.decode_step(x, layers[i], cache.lengths)
            elif block.kind == "moe":
                out, _ = block.mixer(x)
            else:
                out = block.mixer(x)
            h = block.add_to_residual(h, out)
    logits = model.logits(model.final_norm(h[:, 0])).astype(jnp.float32)
    return logits, Cache(tuple(layers), cache.lengths + 1)


def decode_step(model, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Consume one token per row: ``tokens (b,)`` at positions ``cache.lengths``.

    Returns the next-token ``logits (b, vocab)`` float32 and the cache with ``lengths + 1``, every
    array in its own dtype (a bfloat16 SSM state is updated in float32 and stored as bfloat16). A row
    whose length has reached the KV capacity would have its new key dropped: called outside
    ``jit``, that raises ``ValueError`` (size the cache for prompt + new tokens: ``prefill``'s
    ``max_len``). A single step for tests and experiments: it takes the weights and the stacked
    cache apart and puts the cache back together (copies); `generate` / `TokenStream` do that once.
    """
    capacity = cache.max_len
    if capacity is not None and not _is_traced(cache.lengths):
        longest = int(np.max(cache.lengths))
        if longest >= capacity:
            raise ValueError(f"the KV cache is full: a row holds {longest} tokens of {capacity}; build it with "
                             f"room for the tokens to decode (prefill's max_len)")
    logits, flat = _decode_layers(model, tokens, unstack_cache(cache, model.repeats), layer_weights(model))
    return logits, stack_cache(flat, len(model.blocks))


# ------------------------------------------------------------------------------------- sampling

def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next tokens ``(b,)`` int32 from ``logits (b, vocab)``.

    ``temperature == 0``: argmax (greedy; top-k / top-p are irrelevant). Otherwise logits are
    divided by ``temperature``, restricted to the ``top_k`` largest, then to the smallest set of
    largest-probability tokens whose mass reaches ``top_p`` (the top token is always kept), and
    sampled with ``key``.
    """
    _check_temperature(temperature)
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly larger tokens
        threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------- the decoder

@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Everything static about a generation call (part of the compilation key)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    state_dtype: str = "float32"  # "float32" | "bfloat16": the cached SSM state's dtype

    @property
    def fill(self) -> int:
        """Value after a row's end: eos if set (rows stop there), else the pad id (default 0)."""
        if self.eos_token_id is not None:
            return self.eos_token_id
        return 0 if self.pad_token_id is None else self.pad_token_id

    @property
    def tail(self) -> int:
        """Value after a row's ``prompt + max_new_tokens`` in a ragged batch."""
        return self.fill if self.pad_token_id is None else self.pad_token_id


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The token loop's carry. ``cache``: unstacked (`jamba_jax.cache.unstack_cache`); ``tokens``: last
    emitted token per row (the next decode input);
    ``done``: row has emitted eos; ``step``: tokens emitted so far; ``generated (b, max_new_tokens)``
    emitted tokens (``fill`` beyond ``step``)."""

    cache: Cache
    tokens: jax.Array
    done: jax.Array
    step: jax.Array
    generated: jax.Array
    rng: jax.Array


def _emit(state: DecodeState, logits: jax.Array, opts: GenerationOptions) -> DecodeState:
    key = jax.random.fold_in(state.rng, state.step)
    tok = sample(logits, key, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    done = state.done
    if opts.eos_token_id is not None:
        tok = jnp.where(done, opts.eos_token_id, tok)
        done = done | (tok == opts.eos_token_id)
    generated = jax.lax.dynamic_update_index_in_dim(state.generated, tok, state.step, 1)
    return dataclasses.replace(state, tokens=tok, done=done, step=state.step + 1, generated=generated)


def _start(model, input_ids, lengths, rng, opts: GenerationOptions) -> DecodeState:
    b, l = input_ids.shape
    n = opts.max_new_tokens
    logits, cache = prefill(model, input_ids, lengths, max_len=l + max(n - 1, 0),  # the last token is not fed back
                            state_dtype=opts.state_dtype)
    cache = unstack_cache(cache, model.repeats)  # the token loop's form, kept between segments
    state = DecodeState(cache=cache, tokens=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                        step=jnp.zeros((), jnp.int32), generated=jnp.full((b, n), opts.fill, jnp.int32), rng=rng)
    return _emit(state, logits, opts)


def _advance(model, weights, state: DecodeState, until, opts: GenerationOptions) -> DecodeState:
    """Decode until ``step == min(until, max_new_tokens)`` or every row is done. ``weights``:
    `layer_weights(model)`, taken once outside the loop; ``state.cache`` is unstacked."""
    until = jnp.minimum(until, opts.max_new_tokens)

    def cond(s):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s):
        logits, cache = _decode_layers(model, s.tokens, s.cache, weights)
        return _emit(dataclasses.replace(s, cache=cache), logits, opts)

    return jax.lax.while_loop(cond, body, state)


def _assemble(input_ids, lengths, generated, opts: GenerationOptions) -> jax.Array:
    """Row ``i``: its prompt, its ``max_new_tokens`` new tokens, then ``tail`` up to ``l + max_new_tokens``."""
    b, l = input_ids.shape
    n = opts.max_new_tokens
    j = jnp.arange(l + n)[None, :]
    rel = j - lengths[:, None]
    prompt = jnp.pad(input_ids.astype(jnp.int32), [(0, 0), (0, n)])
    new = jnp.take_along_axis(generated, jnp.clip(rel, 0, n - 1), axis=1)
    return jnp.where(rel < 0, prompt, jnp.where(rel < n, new, opts.tail)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate_jit(graphdef, params, input_ids, lengths, rng, opts: GenerationOptions):
    model = nnx.merge(graphdef, params)
    state = _start(model, input_ids, lengths, rng, opts)
    state = _advance(model, layer_weights(model), state, opts.max_new_tokens, opts)
    return _assemble(input_ids, lengths, state.generated, opts)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _start_jit(graphdef, params, input_ids, lengths, rng, opts):
    return _start(nnx.merge(graphdef, params), input_ids, lengths, rng, opts)


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_weights_jit(graphdef, params):
    return layer_weights(nnx.merge(graphdef, params))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(3,))
def _advance_jit(graphdef, params, weights, state, until, opts):
    return _advance(nnx.merge(graphdef, params), weights, state, until, opts)


@functools.partial(jax.jit, static_argnums=(3,))
def _assemble_jit(input_ids, lengths, generated, opts):
    return _assemble(input_ids, lengths, generated, opts)


def _is_traced(x) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(x))


def _check_temperature(temperature) -> None:
    """A number given for the temperature must be finite and >= 0 (a traced one is not checked)."""
    if isinstance(temperature, numbers.Real) and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")


def _integer(name: str, value) -> int:
    """``value`` as an int, or ``ValueError`` (not a silent truncation of 2.7, nor a list)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and np.issubdtype(value.dtype, np.integer):
        return int(value)
    raise ValueError(f"{name} must be a single integer, got {value!r}")


def _check_prompts(ids: np.ndarray, prompt_lengths, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks a right-padded prompt batch; returns the lengths ``(b,)`` int32 and which tokens are
    real (not padding), ``(b, l)`` bool."""
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with batch, length >= 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    b, l = ids.shape
    if prompt_lengths is None:
        lengths = np.full((b,), l, np.int32)
    else:
        given = np.asarray(prompt_lengths)
        if (given.shape != (b,) or not np.issubdtype(given.dtype, np.integer)
                or given.min() < 1 or given.max() > l):
            raise ValueError(f"prompt_lengths must be ({b},) integers in [1, {l}], got {prompt_lengths!r}")
        lengths = given.astype(np.int32)
    real = np.arange(l)[None, :] < lengths[:, None]
    if ids[real].min() < 0 or ids[real].max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}); got min {ids[real].min()}, max {ids[real].max()}")
    return lengths, real


def _prepare(model, input_ids, *, max_new_tokens, temperature, top_k, top_p, eos_token_id, rng,
             prompt_lengths, pad_token_id, state_dtype=jnp.float32):
    """Host-side checks; returns (ids, lengths, rng, opts)."""
    ids = np.asarray(input_ids)
    vocab = model.config.vocab_size
    lengths, real = _check_prompts(ids, prompt_lengths, vocab)
    ids = np.where(real, ids, 0).astype(np.int32)  # padding values never matter; keep them in range
    max_new_tokens = _integer("max_new_tokens", max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    _check_temperature(temperature)
    if top_k is not None and _integer("top_k", top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, tid in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and not 0 <= _integer(name, tid) < vocab:
            raise ValueError(f"{name} must lie in [0, {vocab}), got {tid}")
    state_dtype = check_state_dtype(state_dtype).name
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, numbers.Integral):          # numpy integers are Integral too
        rng = jax.random.key(int(rng))
    opts = GenerationOptions(
        max_new_tokens=max_new_tokens, temperature=float(temperature),
        top_k=None if top_k is None or int(top_k) >= vocab else int(top_k),
        top_p=None if top_p is None or float(top_p) >= 1.0 else float(top_p),
        eos_token_id=None if eos_token_id is None else int(eos_token_id),
        pad_token_id=None if pad_token_id is None else int(pad_token_id), state_dtype=state_dtype)
    return jnp.asarray(ids), jnp.asarray(lengths), rng, opts


def generate(model, input_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, rng=None, prompt_lengths=None,
             pad_token_id: int | None = None, state_dtype=jnp.float32) -> jax.Array:
    """Continue each prompt by ``max_new_tokens`` tokens with the model's cache.

    Args:
      model: a `jamba_jax.LanguageModel`.
      input_ids: ``(b, l)`` int prompts, right-padded when ``prompt_lengths`` is given.
      max_new_tokens: tokens to generate per row.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k, top_p: sampling filters (``None``: off).
      eos_token_id: a row stops when it emits it; its remaining new tokens are ``eos_token_id``.
      rng: a JAX key (or an int seed) for sampling; default ``jax.random.key(0)``. The step-``t``
        key is ``fold_in(rng, t)``: same key, same tokens.
      prompt_lengths: ``(b,)`` real prompt lengths; each row continues exactly as it would alone.
      pad_token_id: value after ``prompt + max_new_tokens`` in ragged rows (default eos, else 0).
      state_dtype: the cached SSM state's dtype, float32 (default) or bfloat16 (``ValueError``
        otherwise). bfloat16 halves the state memory and the bytes each decode step moves, which
        bounds large-batch decoding; the update is still computed in float32.
    Returns:
      ``(b, l + max_new_tokens)`` int32: row ``i`` is its prompt (``prompt_lengths[i]`` tokens),
      its new tokens, then padding. With equal lengths: ``input_ids`` then the new tokens.

    Compiled once per input shape and option set (the token loop runs inside the compiled call).
    """
    ids, lengths, rng, opts = _prepare(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, rng=rng,
                                       prompt_lengths=prompt_lengths, pad_token_id=pad_token_id,
                                       state_dtype=state_dtype)
    if opts.max_new_tokens == 0:
        return ids if prompt_lengths is None else jnp.where(
            jnp.arange(ids.shape[1])[None] < lengths[:, None], ids, opts.tail)
    graphdef, params = nnx.split(model)
    return _generate_jit(graphdef, params, ids, lengths, rng, opts)


class TokenStream:
    """`generate` in pieces, for printing tokens as they are produced and for timing.

    ``start()`` compiles nothing new after `compile` and runs prefill + the first token;
    ``step()`` decodes up to ``chunk`` more tokens (one compiled while-loop call) and returns them
    ``(b, k)`` (``k = 0`` when finished); ``output_ids()`` is `generate`'s result. Same options and
    same tokens as `generate` (the step-``t`` sampling key is ``fold_in(rng, t)`` in both), including
    ``state_dtype``.
    """

    def __init__(self, model, input_ids, *, max_new_tokens: int, chunk: int = 16, temperature: float = 0.0,
                 top_k=None, top_p=None, eos_token_id=None, rng=None, prompt_lengths=None, pad_token_id=None,
                 state_dtype=jnp.float32):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 for a stream, got {max_new_tokens}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.ids, self.lengths, self.rng, self.opts = _prepare(
            model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, rng=rng, prompt_lengths=prompt_lengths, pad_token_id=pad_token_id,
            state_dtype=state_dtype)
        self.chunk = chunk
        self.graphdef, self.params = nnx.split(model)
        self._start_fn = self._advance_fn = None
        self.weights = None  # `layer_weights`, taken once by `compile` (a second copy of the weights)
        self.state: DecodeState | None = None
        self.emitted = 0

    def compile(self) -> float:
        """Compile the prefill and decode-segment calls ahead of time; returns seconds spent."""
        t0 = time.perf_counter()
        lowered = _start_jit.lower(self.graphdef, self.params, self.ids, self.lengths, self.rng, self.opts)
        self._start_fn = lowered.compile()
        self.weights = _layer_weights_jit(self.graphdef, self.params)
        self._advance_fn = _advance_jit.lower(self.graphdef, self.params, self.weights, lowered.out_info,
                                              jnp.int32(0), self.opts).compile()
        return time.perf_counter() - t0

    def start_state(self) -> DecodeState:
        """The compiled prefill + first token, without waiting for it (for timing loops)."""
        if self._start_fn is None:
            self.compile()
        return self._start_fn(self.params, self.ids, self.lengths, self.rng)

    def advance_state(self, state: DecodeState, until: int) -> DecodeState:
        """The compiled decode segment up to ``until`` tokens emitted; ``state`` is donated."""
        if self._advance_fn is None:
            self.compile()
        return self._advance_fn(self.params, self.weights, state, jnp.int32(until))

    def start(self) -> np.ndarray:
        """Prefill and the first new token per row, ``(b, 1)``."""
        self.state = self.start_state()
        self.emitted = 1
        return np.asarray(self.state.generated[:, :1])

    @property
    def finished(self) -> bool:
        return self.state is not None and (self.emitted >= self.opts.max_new_tokens or bool(jnp.all(self.state.done)))

    def step(self) -> np.ndarray:
        """Up to ``chunk`` more tokens per row, ``(b, k)``; ``k == 0`` once finished."""
        if self.state is None:
            return self.start()
        if self.finished:
            return np.zeros((self.ids.shape[0], 0), np.int32)
        self.state = self.advance_state(self.state, self.emitted + self.chunk)
        step = int(self.state.step)
        out = np.asarray(self.state.generated[:, self.emitted:step])
        self.emitted = step
        return out

    def __iter__(self):
        yield self.start()
        while not self.finished:
            yield self.step()

    def output_ids(self) -> jax.Array:
        return _assemble_jit(self.ids, self.lengths, self.state.generated, self.opts)


# ------------------------------------------------------------------------------ loading for the CLI

#: (name, detect(path) -> bool, load(path, dtype, param_dtype) -> LanguageModel), tried in order.
_LOADERS: list[tuple[str, Callable[[Path], bool], Callable]] = []


def register_loader(name: str, detect: Callable[[Path], bool], load: Callable, *, first: bool = False) -> None:
    """Teach `load_model` a directory layout. ``detect(path)`` says whether ``path`` has it;
    ``load(path, dtype=..., param_dtype=...)`` returns a `LanguageModel`. Training checkpoints
    register here (``first=True`` to take precedence over the transformers layout)."""
    entry = (name, detect, load)
    if first:
        _LOADERS.insert(0, entry)
    else:
        _LOADERS.append(entry)


def _is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _load_transformers_dir(path: Path, *, dtype, param_dtype):
    from jamba_jax.convert import from_pretrained

    return from_pretrained(path, dtype=dtype, param_dtype=param_dtype)


register_loader("transformers / mamba_ssm checkpoint (config.json + safetensors or pytorch_model.bin)",
                _is_transformers_dir, _load_transformers_dir)
# TODO(trainer): register the training-checkpoint layout, e.g.
#   register_loader("jamba_jax training checkpoint", lambda p: (p / "<marker>").exists(), load_fn, first=True)


def load_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None):
    """Load a model directory, dispatching on its layout (see `register_loader`).

    ``dtype``: activation dtype; ``param_dtype``: matrix storage dtype (default: ``dtype``).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r} is not a directory")
    param_dtype = dtype if param_dtype is None else param_dtype
    for _, detect, load in _LOADERS:
        if detect(path):
            return load(path, dtype=dtype, param_dtype=param_dtype)
    known = "; ".join(name for name, _, _ in _LOADERS)
    raise ValueError(f"{str(path)!r} has no layout this loader knows (looked for: {known})")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (used when the model directory has no ``tokenizer.json``)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike):
    """``tokenizer.json`` in the directory if present, else `ByteTokenizer`."""
    file = Path(path) / "tokenizer.json"
    return HFTokenizer(file) if file.is_file() else ByteTokenizer()


def _config_eos(cfg) -> int | None:
    eos = cfg.extra.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) and 0 <= eos < cfg.vocab_size else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jamba_jax.generate",
                                     description="Generate text from a model directory, streaming tokens.")
    parser.add_argument("--model", required=True, help="model directory (transformers layout, config.json)")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activation and weight-storage dtype")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="cached SSM state dtype; bfloat16 halves the state bytes each decode step moves")
    parser.add_argument("--chunk", type=int, default=8, help="tokens decoded per host round trip")
    parser.add_argument("--eos-token-id", type=int, default=None, help="default: the config's eos_token_id")
    parser.add_argument("--ignore-eos", action="store_true", help="never stop early")
    args = parser.parse_args(argv)

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        parser.error("the prompt encodes to no tokens")
    if max(prompt) >= model.config.vocab_size:
        parser.error(f"the prompt has token id {max(prompt)} but the model's vocabulary is "
                     f"{model.config.vocab_size} (byte-level prompts need a vocabulary of at least 256)")
    eos = None if args.ignore_eos else (args.eos_token_id if args.eos_token_id is not None
                                        else _config_eos(model.config))
    stream = TokenStream(model, np.asarray([prompt], np.int32), max_new_tokens=args.max_new_tokens,
                         chunk=args.chunk, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=eos, rng=jax.random.key(args.seed), state_dtype=args.state_dtype)
    compile_s = stream.compile()

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    new: list[int] = []
    printed = ""

    def show(tokens) -> None:
        nonlocal printed
        new.extend(int(t) for t in tokens)
        shown = new if eos is None or eos not in new else new[:new.index(eos)]
        text = tokenizer.decode(shown).rstrip("\ufffd")  # hold back an incomplete UTF-8 sequence
        if text.startswith(printed):
            out.write(text[len(printed):])
        out.flush()
        printed = text

    t0 = time.perf_counter()
    show(stream.start()[0])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not stream.finished:
        show(stream.step()[0])
    decode_s = time.perf_counter() - t0
    out.write("\n")
    n_decoded = len(new) - 1
    print(f"[load {load_s:.2f} s, compile {compile_s:.2f} s] "
          f"prefill: {len(prompt)} tokens in {prefill_s * 1e3:.1f} ms ({len(prompt) / prefill_s:.1f} tokens/s, "
          f"first token included); decode: {n_decoded} tokens in {decode_s * 1e3:.1f} ms "
          f"({n_decoded / decode_s if decode_s > 0 and n_decoded else float('nan'):.1f} tokens/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
