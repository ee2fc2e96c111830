"""The causal LM: embedding, a stack of pre-norm residual sublayers, final norm, LM head.

The stack is stored as one *period* of blocks whose parameters carry a leading ``layers`` axis
(one entry per repetition) and is run with ``jax.lax.scan`` over the repetitions, so compile time
depends on the period, not the depth. A stack that does not repeat is a period of its own length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jamba_jax.config import ModelConfig
from jamba_jax.layers.attention import Attention
from jamba_jax.layers.common import RMSNorm, dense, logical
from jamba_jax.layers.mamba1 import Mamba1Mixer
from jamba_jax.layers.mamba2 import Mamba2Mixer
from jamba_jax.layers.mlp import MLP
from jamba_jax.layers.moe import MoE
from jamba_jax.ops import positions_from_segments

AUX_KEYS = ("load_balancing_loss", "router_z_loss")

#: Rematerialisation policies for each block in the backward pass: what is kept, what recomputed.
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
}


#: The module behind each layer kind.
MIXERS = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer, "attention": Attention, "mlp": MLP, "moe": MoE}


class Block(nnx.Module):
    """``h + residual_multiplier * mixer(norm(h))``; returns the new residual and the sublayer's
    auxiliary losses."""

    def __init__(self, kind: str, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, impl: str = "auto"):
        self.kind = kind
        self.residual_multiplier = cfg.residual_multiplier
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kind in ("mamba1", "mamba2"):
            kwargs["impl"] = impl
        self.mixer = MIXERS[kind](getattr(cfg, kind), cfg.d_model, **kwargs)

    def __call__(self, h: jax.Array, *, segment_ids: jax.Array | None, positions: jax.Array | None):
        x = self.norm(h)
        aux = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
        if self.kind == "attention":
            out = self.mixer(x, segment_ids=segment_ids, positions=positions)
        elif self.kind in ("mamba1", "mamba2"):
            out = self.mixer(x, segment_ids=segment_ids)
        elif self.kind == "moe":
            out, moe_aux = self.mixer(x)
            aux = {k: aux[k] + moe_aux[k] for k in AUX_KEYS}
        else:
            out = self.mixer(x)
        return self.add_to_residual(h, out), aux

    def add_to_residual(self, h: jax.Array, out: jax.Array) -> jax.Array:
        """The residual stream ``h`` after this sublayer's output ``out`` joins it (every caller:
        the forward pass, prefill and decode, goes through here)."""
        out = out.astype(h.dtype)
        if self.residual_multiplier != 1.0:
            out = out * jnp.asarray(self.residual_multiplier, h.dtype)
        return h + out


class LanguageModel(nnx.Module):
    """``model(input_ids (b, l), segment_ids=None) -> logits (b, l, vocab)``.

    ``dtype`` is the activation dtype, ``param_dtype`` the storage dtype of matrices; SSM
    parameters (``A_log``, ``D``, ``dt_bias``) and norm weights are float32 always.
    ``impl`` selects the SSM op backend (``"auto"``, ``"xla"``, ``"reference"``, ...); ``remat`` one
    of `REMAT_POLICIES` for training.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 impl: str = "auto", remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"), rngs=rngs)
        period = cfg.period
        repeats = cfg.n_layers // period

        def stacked(kind: str) -> Block:
            @nnx.split_rngs(splits=repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Block(kind, cfg, dtype=dtype, param_dtype=param_dtype, rngs=r, impl=impl)

            return make(rngs)

        self.blocks = nnx.List([stacked(kind) for kind in cfg.layers[:period]])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = (None if cfg.tie_embeddings else
                        dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs))

    @property
    def repeats(self) -> int:
        return self.config.n_layers // self.config.period

    def hidden_states(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None, return_all: bool = False):
        """Final-normed hidden states ``(b, l, d_model)`` and the summed auxiliary losses.

        With ``return_all`` also the residual stream after every sublayer, ``(n_layers, b, l, d_model)``
        (before the final norm), for layer-by-layer comparisons.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)            # lists and numpy arrays too
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        if not isinstance(input_ids, jax.core.Tracer):
            ids = np.asarray(input_ids)
            if ids.ndim != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got min {ids.min()}, max {ids.max()}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids must have input_ids' shape {input_ids.shape}, got {segment_ids.shape}")
        if positions is None and segment_ids is not None:
            positions = positions_from_segments(segment_ids)
        h = self.embed_tokens(input_ids)

        graphdefs, stacked_states = zip(*(nnx.split(block) for block in self.blocks))

        def run_block(graphdef, state, h):
            return nnx.merge(graphdef, state)(h, segment_ids=segment_ids, positions=positions)

        if self.remat != "none":
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))

        def period_step(carry, period_states):
            h, aux = carry
            outputs = []
            for graphdef, state in zip(graphdefs, period_states):
                h, block_aux = run_block(graphdef, state, h)
                aux = {k: aux[k] + block_aux[k] for k in AUX_KEYS}
                outputs.append(h)
            return (h, aux), (jnp.stack(outputs) if return_all else None)

        aux0 = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
        (h, aux), per_layer = jax.lax.scan(period_step, (h, aux0), stacked_states)
        if return_all:
            return self.final_norm(h), aux, per_layer.reshape(cfg.n_layers, *h.shape)
        return self.final_norm(h), aux

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """The residual stream entering the first sublayer: embeddings times
        ``embedding_multiplier``, float32 if ``residual_in_fp32``."""
        cfg = self.config
        h = self.embed(input_ids)
        h = h.astype(jnp.float32) if cfg.residual_in_fp32 else h
        if cfg.embedding_multiplier != 1.0:
            h = h * jnp.asarray(cfg.embedding_multiplier, h.dtype)
        return h

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed states ``(..., d_model)`` -> logits, divided by ``logits_divisor``."""
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.config.logits_divisor != 1.0:
            logits = logits / jnp.asarray(self.config.logits_divisor, logits.dtype)
        return logits

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_aux: bool = False):
        h, aux = self.hidden_states(input_ids, segment_ids=segment_ids, positions=positions)
        logits = self.logits(h)
        return (logits, aux) if return_aux else logits
