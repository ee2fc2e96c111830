"""Dropless top-k mixture of experts (Jamba / Mixtral softmax router, Nemotron-H sigmoid router).

Expert compute is grouped: each token is repeated ``top_k`` times, the (token, slot) rows are sorted by
expert and fed through a grouped matmul (``pallas_kernels.ragged_dot``: ``jax.lax.ragged_dot``, or JAX's
Mosaic GPU kernels on Hopper) with ``group_sizes`` = rows per expert, so no token is
ever dropped and no capacity padding is needed. Under a trainer's mesh the sort stays on each device
(`MoE._experts_ragged`: ``jax.shard_map`` over the batch, with tensor- and expert-parallel weights).
``impl="dense"`` runs every expert on every token (einsum) and is kept as a numerical reference.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jamba_jax.config import MLPConfig, MoEConfig
from jamba_jax.layers.common import GATED_ACTIVATIONS, activation, default_kernel_init, dense, logical_sharding, param
from jamba_jax.layers.mlp import MLP
from pallas_kernels.ragged_dot import ragged_dot

Impl = Literal["ragged", "dense"]


class RoutingBias(nnx.Variable):
    """Non-trainable per-expert bias used for expert *selection* only (DeepSeek-V3 / Nemotron-H
    ``e_score_correction_bias``). Not an ``nnx.Param``: optimizers over ``nnx.Param`` skip it, and it
    receives no gradient; update it outside the optimizer if doing aux-loss-free balancing."""


def route(logits: jax.Array, cfg: MoEConfig, correction_bias: jax.Array | None = None):
    """Router logits ``(T, E)`` (float32) -> ``(weights (T, k) f32, experts (T, k) int32)``.

    softmax: top-k of ``softmax(logits)``, renormalised if ``cfg.normalize_top_k``.
    sigmoid: ``s = sigmoid(logits)``; experts chosen on ``s + correction_bias`` within the
    ``top_k_groups`` best groups (group score = sum of its top-2); weights = ``s`` at the chosen experts,
    renormalised (``+1e-20``) if ``cfg.normalize_top_k``, times ``cfg.routed_scaling``.
    """
    k = cfg.top_k
    if cfg.router == "softmax":
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
        if cfg.normalize_top_k:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        scores = jax.nn.sigmoid(logits)
        choice = scores
        if correction_bias is not None:
            choice = choice + jax.lax.stop_gradient(correction_bias.astype(jnp.float32))
        choice = jax.lax.stop_gradient(choice)
        if cfg.top_k_groups < cfg.n_groups:
            t, e = choice.shape
            grouped = choice.reshape(t, cfg.n_groups, e // cfg.n_groups)
            group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, e // cfg.n_groups))[0], axis=-1)
            _, best_groups = jax.lax.top_k(group_scores, cfg.top_k_groups)  # (T, top_k_groups)
            keep = jnp.any(best_groups[:, :, None] == jnp.arange(cfg.n_groups)[None, None, :], axis=1)
            choice = jnp.where(jnp.repeat(keep, e // cfg.n_groups, axis=-1), choice, -jnp.inf)
        _, experts = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.normalize_top_k:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling
    return weights, experts.astype(jnp.int32)


def router_aux_losses(logits: jax.Array, experts: jax.Array, n_experts: int) -> dict[str, jax.Array]:
    """Unweighted auxiliary losses from router logits ``(T, E)`` and chosen experts ``(T, k)``.

    ``load_balancing_loss = E * sum_e f_e * P_e`` with ``f_e`` = (top-k slots routed to ``e``) / T (so
    ``sum_e f_e = k``, as transformers' ``load_balancing_loss_func``; a perfectly balanced router gives
    ``k``) and ``P_e`` = mean over tokens of ``softmax(logits)[:, e]``. The same formula is used for
    the sigmoid router (softmax of its logits, fractions from its actual selection).
    ``router_z_loss = mean_t logsumexp(logits_t)^2``.
    """
    logits = logits.astype(jnp.float32)
    t = logits.shape[0]
    probs = jax.nn.softmax(logits, axis=-1)
    counts = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=(0, 1))
    fraction = jax.lax.stop_gradient(counts) / t
    lb = n_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return {"load_balancing_loss": lb, "router_z_loss": z}


def grouped_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array | None, up: jax.Array,
                    down: jax.Array, act, *, first_expert=0) -> jax.Array:
    """Dropless grouped expert compute: ``x`` ``(..., d)``, ``weights`` / ``experts`` ``(..., k)`` ->
    ``(..., d)`` float32, the routed experts' outputs weighted and summed per token.

    ``gate`` (None for ungated activations) and ``up`` ``(E_local, d, f)``, ``down`` ``(E_local, f, d)``
    hold experts ``first_expert .. first_expert + E_local - 1``; slots routed to other experts add
    nothing (sorted past the last group, where ``ragged_dot`` writes zeros).
    """
    lead, d, k = x.shape[:-1], x.shape[-1], experts.shape[-1]
    x, weights, experts = x.reshape(-1, d), weights.reshape(-1, k), experts.reshape(-1)  # slot r: token r // k
    n_local = up.shape[0]
    slot_expert = experts - first_expert
    held = (slot_expert >= 0) & (slot_expert < n_local)
    slot_expert = jnp.where(held, slot_expert, n_local)
    order = jnp.argsort(slot_expert, stable=True)
    group_sizes = jnp.bincount(slot_expert, length=n_local + 1)[:n_local].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # (T*k, d) sorted by expert
    h = ragged_dot(xs, up, group_sizes)
    h = act(ragged_dot(xs, gate, group_sizes)) * h if gate is not None else act(h)
    ys = ragged_dot(h, down, group_sizes)  # (T*k, d) sorted
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = jnp.take(ys, inverse, axis=0).reshape(-1, k, d).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y, weights).reshape(*lead, d)


def _axis_tuple(entry) -> tuple[str, ...]:
    """Mesh axes of one ``PartitionSpec`` entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


class MoE(nnx.Module):
    """Dropless top-k MoE sublayer, optionally with a shared expert added to the routed output.

    Parameters (``E`` experts, ``d`` = d_model, ``f`` = cfg.d_ff):
      ``router``: ``nnx.Linear`` kernel ``(d, E)``, names ``('embed', None)``, no bias, run in float32.
      ``e_score_correction_bias``: ``RoutingBias`` ``(E,)`` (sigmoid router only; zeros at init).
      ``gate_proj`` ``(E, d, f)`` (gated activations only) and ``up_proj`` ``(E, d, f)``, names
      ``('expert', 'embed', 'mlp')``; ``down_proj`` ``(E, f, d)``, names ``('expert', 'mlp', 'embed')``.
      ``shared_expert``: ``MLP`` with ``d_ff = cfg.shared_d_ff`` and no bias, if ``cfg.shared_d_ff > 0``.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, *, impl: Impl = "ragged", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if impl not in ("ragged", "dense"):
            raise ValueError(f"impl must be 'ragged' or 'dense', got {impl!r}")
        self.cfg = cfg
        self.impl = impl
        self.dtype = dtype
        self.gated = cfg.activation in GATED_ACTIVATIONS
        self.activation = cfg.activation  # a name, so the module's static data stays hashable/comparable
        e, d, f = cfg.n_experts, d_model, cfg.d_ff
        self.router = dense(d, e, ("embed", None), dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        if cfg.router == "sigmoid":
            self.e_score_correction_bias = RoutingBias(jnp.zeros((e,), jnp.float32), out_sharding=("expert",),
                                                       eager_sharding=False)
        else:
            self.e_score_correction_bias = None
        in_names, out_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        if self.gated:
            self.gate_proj = param(rngs, default_kernel_init, (e, d, f), in_names, param_dtype)
        self.up_proj = param(rngs, default_kernel_init, (e, d, f), in_names, param_dtype)
        self.down_proj = param(rngs, default_kernel_init, (e, f, d), out_names, param_dtype)
        if cfg.shared_d_ff > 0:
            shared_cfg = MLPConfig(d_ff=cfg.shared_d_ff, activation=cfg.activation, bias=False)
            self.shared_expert = MLP(shared_cfg, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.shared_expert = None

    def router_logits(self, x2: jax.Array) -> jax.Array:
        """Tokens ``(T, d)`` -> float32 logits ``(T, E)``."""
        return self.router(x2.astype(jnp.float32))

    def _expert_weights(self):
        gate = self.gate_proj[...].astype(self.dtype) if self.gated else None
        return gate, self.up_proj[...].astype(self.dtype), self.down_proj[...].astype(self.dtype)

    def _experts_ragged(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """Grouped compute on each device's own tokens: ``x`` ``(b, l, d)``, ``weights`` /
        ``experts`` ``(b, l, k)`` -> ``(b, l, d)`` float32.

        Outside a trainer's mesh (`jamba_jax.layers.common.activation_sharding`) this is
        `grouped_experts` on all tokens. Under one, the sort by expert must not span devices (XLA
        would gather every token and run the whole layer, and all that follows it, on each device),
        so it runs inside ``jax.shard_map``: each device routes its batch rows through the experts
        it holds. Expert weights arrive whole along ``embed`` (FSDP: gathered for the layer) and split
        along ``expert`` and ``mlp`` as the logical-axis table says. Over a mesh axis that splits the
        weights, a device's output is a partial sum (its experts, its slice of ``d_ff``): where that
        axis also splits the batch, the devices' tokens are gathered first and the sums scattered back
        to their rows; where it does not, every device holds the same tokens and the sums are added.

        Gathering is the simple form of expert parallelism (Megatron's "allgather" dispatcher): each
        device sees every gathered row, and the grouped matmul's row tiles past its own experts' rows
        still run (JAX's Mosaic GPU kernels visit them and store nothing), so with N devices along the
        expert axis the forward and input-gradient products cost up to N times their share. An
        all-to-all dispatch would avoid it.

        ``check_vma=False``: JAX types ``argsort`` of device-varying keys, and the Mosaic GPU kernels'
        outputs, as equal on every device, and would then sum cotangents across devices wrongly.
        """
        gate, up, down = self._expert_weights()
        act = activation(self.activation)
        x_sharding = logical_sharding(x, ("batch", None, None))
        if x_sharding is None:
            return grouped_experts(x, weights, experts, gate, up, down, act)
        mesh, batch_spec = x_sharding.mesh, x_sharding.spec[0]
        w_spec = logical_sharding(up, ("expert", None, "mlp")).spec
        expert_axes, mlp_axes = _axis_tuple(w_spec[0]), _axis_tuple(w_spec[2])
        split_weights = expert_axes + mlp_axes
        gathered = tuple(a for a in split_weights if a in _axis_tuple(batch_spec))
        summed = tuple(a for a in split_weights if a not in gathered)
        rows = P(batch_spec, None, None)

        def local(x, weights, experts, gate, up, down):
            if gathered:
                x, weights, experts = (jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                                       for a in (x, weights, experts))
            first = jax.lax.axis_index(expert_axes) * up.shape[0] if expert_axes else 0
            y = grouped_experts(x, weights, experts, gate, up, down, act, first_expert=first)
            if gathered:
                y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
            return jax.lax.psum(y, summed) if summed else y

        in_specs = (rows, rows, rows, *(None if w is None else P(w_spec[0], None, w_spec[2]) for w in (gate, up)),
                    P(w_spec[0], w_spec[2], None))
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(
            x, weights, experts, gate, up, down)

    def _experts_dense(self, x2, weights, experts):
        """Reference: every expert on every token, then select and weight. ``(T, d)`` float32."""
        gate, up, down = self._expert_weights()
        act = activation(self.activation)
        h = jnp.einsum("td,edf->tef", x2, up)
        h = act(jnp.einsum("td,edf->tef", x2, gate)) * h if self.gated else act(h)
        y = jnp.einsum("tef,efd->ted", h, down).astype(jnp.float32)
        combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(experts, self.cfg.n_experts, dtype=jnp.float32), weights)
        return jnp.einsum("ted,te->td", y, combine)

    def __call__(self, x: jax.Array, *, impl: Impl | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x`` ``(b, l, d)`` -> ``(y (b, l, d) in dtype, {"load_balancing_loss", "router_z_loss"})``,
        the losses float32 scalars, unweighted."""
        impl = impl or self.impl
        b, l, d = x.shape
        x2 = x.reshape(b * l, d)
        logits = self.router_logits(x2)
        bias = self.e_score_correction_bias[...] if self.e_score_correction_bias is not None else None
        weights, experts = route(logits, self.cfg, bias)
        if impl == "ragged":
            k = experts.shape[-1]
            y = self._experts_ragged(x.astype(self.dtype), weights.reshape(b, l, k), experts.reshape(b, l, k))
        elif impl == "dense":
            y = self._experts_dense(x2.astype(self.dtype), weights, experts).reshape(b, l, d)
        else:
            raise ValueError(f"impl must be 'ragged' or 'dense', got {impl!r}")
        if self.shared_expert is not None:
            y = y + self.shared_expert(x).astype(jnp.float32)
        return y.astype(self.dtype), router_aux_losses(logits, experts, self.cfg.n_experts)
