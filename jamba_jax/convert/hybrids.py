"""Hybrid families: Jamba, Nemotron-H, Bamba and Granite 4.0 (transformers 5.x layouts and semantics).

Layer mapping (``L`` = decoder layers in the checkpoint, our stack has one sublayer per mixer):

* ``jamba``: decoder layer ``i`` = ``input_layernorm`` + (Mamba-1 with weighted dt/B/C norms, or
  attention) then ``pre_ff_layernorm`` + (MLP or MoE) -> our sublayers ``2i`` and ``2i + 1``.
  Attention where ``i % attn_layer_period == attn_layer_offset``, MoE where
  ``i % expert_layer_period == expert_layer_offset`` and ``num_experts > 1``.
* ``nemotron_h``: one block per entry of ``layers_block_type`` (or the legacy
  ``hybrid_override_pattern``), each ``norm`` + one mixer -> one sublayer.
* ``bamba``: decoder layer ``i`` = (Mamba-2, or attention with partial RoPE at
  ``attn_layer_indices``) then a SwiGLU MLP -> sublayers ``2i`` and ``2i + 1``.
* ``granitemoehybrid`` (IBM Granite 4.0-H): decoder layer ``i`` = (Mamba-2 or attention, by
  ``layer_types``) then (a SwiGLU MoE renormalised over its top k plus a shared SwiGLU MLP, or the
  shared MLP alone when ``num_local_experts == 0``) -> sublayers ``2i`` and ``2i + 1``; its muP
  scalars (``embedding_multiplier``, ``residual_multiplier``, ``logits_scaling``,
  ``attention_multiplier``) are `ModelConfig` / `AttentionConfig` fields.

Readers accept the older checkpoint layouts that transformers itself converts on load: Jamba's
per-expert ``experts.{e}.{gate,up,down}_proj.weight`` and Nemotron-H's ``backbone.`` prefix and
per-expert ``experts.{e}.{up,down}_proj.weight``, and the 5.x in-memory module layout (fused experts,
``model.`` prefix). Writers use the on-disk layout that transformers' own ``save_pretrained`` writes
(per-expert, ``backbone.``), which every transformers version and other tools read.
Anything a family cannot express raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import math

from jamba_jax.config import (AttentionConfig, Mamba1Config, Mamba2Config, MLPConfig, ModelConfig, MoEConfig,
                              RopeConfig)
from jamba_jax.convert.families import Family, _base_hf, integer_ratio, lm_rules, register
from jamba_jax.convert.rules import (LayoutChoice, Rule, SplitRule, StackRule, linear_rules, mamba1_rules,
                                     mamba2_rules, with_prefix_alias)


def _unsupported(model_type: str, what: str) -> ValueError:
    return ValueError(f"{model_type}: {what} is not supported")


def _prev(cfg: ModelConfig, model_type: str) -> dict:
    """The source config.json if it was of ``model_type`` (defaults for fields we do not model)."""
    return cfg.extra if cfg.extra.get("model_type") == model_type else {}


def _attention_rules(hf: str, ours: str, att: AttentionConfig) -> list:
    rules = []
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += linear_rules(f"{hf}.{name}", f"{ours}.{name}", att.qkv_bias)
    return rules + linear_rules(f"{hf}.o_proj", f"{ours}.o_proj", att.out_bias)


def _mlp_rules(hf: str, ours: str, mlp: MLPConfig) -> list:
    names = ("gate_proj", "up_proj", "down_proj") if mlp.activation in ("swiglu", "geglu") else ("up_proj", "down_proj")
    return [r for name in names for r in linear_rules(f"{hf}.{name}", f"{ours}.{name}", mlp.bias)]


def _decoder_pair_rules(cfg: ModelConfig, mixer_rules, ff_rules, *, embed: str, final_norm: str,
                        ff_norm: str = "pre_ff_layernorm", ff_module: str = ".feed_forward") -> list:
    """Jamba / Bamba / Granite: decoder layer ``i`` holds our sublayers ``2i`` (mixer) and ``2i + 1``
    (feed-forward: the norm ``ff_norm``, then ``ff_rules`` under the layer's prefix + ``ff_module``)."""
    rules = [Rule(embed, "embed.embedding"), Rule(final_norm, "final_norm.weight")]
    if not cfg.tie_embeddings:
        rules += linear_rules("lm_head", "lm_head", False)
    for i in range(cfg.n_layers // 2):
        hf = f"model.layers.{i}"
        rules += [Rule(f"{hf}.input_layernorm.weight", f"layers.{2 * i}.norm.weight"),
                  Rule(f"{hf}.{ff_norm}.weight", f"layers.{2 * i + 1}.norm.weight")]
        rules += mixer_rules(hf, f"layers.{2 * i}.mixer", cfg.layers[2 * i])
        rules += ff_rules(f"{hf}{ff_module}", f"layers.{2 * i + 1}.mixer", cfg.layers[2 * i + 1])
    return rules


def _split_pairs(cfg: ModelConfig, model_type: str, mixers: set, ffs: set) -> tuple[tuple, tuple]:
    layers = cfg.layers
    if len(layers) % 2 or not set(layers[0::2]) <= mixers or not set(layers[1::2]) <= ffs:
        raise ValueError(f"{model_type} stacks decoder layers of a mixer ({' or '.join(sorted(mixers))}) then a "
                         f"feed-forward ({' or '.join(sorted(ffs))}); cannot hold layers {layers}")
    return layers[0::2], layers[1::2]


def _find_period(flags: list[bool], preferred: tuple, what: str) -> tuple[int, int]:
    """``(period, offset)`` with ``flags[i] == (i % period == offset)`` for all ``i``."""
    n = len(flags)
    candidates = [preferred] if None not in preferred else []
    candidates += [(p, o) for p in range(1, n + 2) for o in range(p)]
    for p, o in candidates:
        if 0 <= o < p and all(f == (i % p == o) for i, f in enumerate(flags)):
            return p, o
    raise ValueError(f"jamba: {what} at decoder layers {[i for i, f in enumerate(flags) if f]} do not follow "
                     "one period and offset")


def _rms_eps_check(cfg: ModelConfig, model_type: str, sub, name: str) -> None:
    if sub is not None and sub.norm_eps != cfg.norm_eps:
        raise ValueError(f"{model_type} shares one RMSNorm epsilon: {name}.norm_eps={sub.norm_eps} must equal "
                         f"norm_eps={cfg.norm_eps}")


# --- Jamba ------------------------------------------------------------------------------------------

def _jamba_from_hf(hf: dict) -> ModelConfig:
    d_model = hf.get("hidden_size", 4096)
    n = hf.get("num_hidden_layers", 32)
    eps = hf.get("rms_norm_eps", 1e-6)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("jamba", f"hidden_act={act!r} (it is both the Mamba conv activation and the "
                                    "MLP gate activation; only 'silu' is supported)")
    ap, ao = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    ep, eo = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    if not (0 <= ao < ap and 0 <= eo < ep):
        raise ValueError(f"jamba: layer offsets must lie in [0, period): attn {ao}/{ap}, expert {eo}/{ep}")
    n_experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    layers = []
    for i in range(n):  # transformers' layers_block_type / layers_num_experts
        layers.append("attention" if i % ap == ao else "mamba1")
        layers.append("moe" if n_experts > 1 and i % ep == eo else "mlp")
    rank = hf.get("mamba_dt_rank", "auto")
    m1 = Mamba1Config(d_inner=int(hf.get("mamba_expand", 2) * d_model), d_state=hf.get("mamba_d_state", 16),
                      d_conv=hf.get("mamba_d_conv", 4),
                      dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank),
                      conv_bias=hf.get("mamba_conv_bias", True), proj_bias=hf.get("mamba_proj_bias", False),
                      bcdt_norm="weighted", norm_eps=eps)
    heads = hf.get("num_attention_heads", 32)
    att = AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                          head_dim=hf.get("head_dim") or d_model // heads)
    d_ff = hf.get("intermediate_size", 14336)
    mlp = MLPConfig(d_ff=d_ff, activation="swiglu")
    moe = None
    if "moe" in layers:
        moe = MoEConfig(n_experts=n_experts, top_k=hf.get("num_experts_per_tok", 2), d_ff=d_ff, activation="swiglu",
                        router="softmax", normalize_top_k=False,
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(vocab_size=hf.get("vocab_size", 65536), d_model=d_model, layers=tuple(layers),
                       mamba1=m1 if "mamba1" in layers else None, attention=att if "attention" in layers else None,
                       mlp=mlp if "mlp" in layers else None, moe=moe, norm_eps=eps,
                       tie_embeddings=hf.get("tie_word_embeddings", False), model_type="jamba", extra=hf)


def _jamba_to_hf(cfg: ModelConfig) -> dict:
    mixers, ffs = _split_pairs(cfg, "jamba", {"mamba1", "attention"}, {"mlp", "moe"})
    prev = _prev(cfg, "jamba")
    hf = _base_hf(cfg, "jamba", "JambaForCausalLM")
    hf.update(num_hidden_layers=len(mixers), rms_norm_eps=cfg.norm_eps, hidden_act="silu")
    ap, ao = _find_period([k == "attention" for k in mixers],
                          (prev.get("attn_layer_period"), prev.get("attn_layer_offset")), "attention layers")
    hf.update(attn_layer_period=ap, attn_layer_offset=ao)
    if cfg.mamba1 is not None and "mamba1" in mixers:
        m1 = cfg.mamba1
        if m1.bcdt_norm != "weighted":
            raise ValueError(f"jamba's Mamba layers have weighted dt/B/C norms, not mamba1.bcdt_norm={m1.bcdt_norm!r}")
        _rms_eps_check(cfg, "jamba", m1, "mamba1")
        hf.update(mamba_d_state=m1.d_state, mamba_d_conv=m1.d_conv, mamba_dt_rank=m1.dt_rank,
                  mamba_expand=integer_ratio(m1.d_inner, cfg.d_model, "mamba1.d_inner as mamba_expand"),
                  mamba_conv_bias=m1.conv_bias, mamba_proj_bias=m1.proj_bias)
    if cfg.attention is not None and "attention" in mixers:
        att = cfg.attention
        if att.rope is not None or att.qkv_bias or att.out_bias:
            raise ValueError("jamba attention has no positional encoding and no biases "
                             f"(attention.rope={att.rope}, qkv_bias={att.qkv_bias}, out_bias={att.out_bias})")
        hf.update(num_attention_heads=att.n_heads, num_key_value_heads=att.n_kv_heads)
        if att.head_dim != cfg.d_model // att.n_heads:
            hf["head_dim"] = att.head_dim
        else:
            hf.pop("head_dim", None)
    d_ff = set()
    if "mlp" in ffs:
        mlp = cfg.mlp
        if mlp.activation != "swiglu" or mlp.bias:
            raise ValueError(f"jamba MLPs are SwiGLU without bias (mlp.activation={mlp.activation!r}, "
                             f"mlp.bias={mlp.bias})")
        d_ff.add(mlp.d_ff)
    if "moe" in ffs:
        moe = cfg.moe
        if (moe.activation != "swiglu" or moe.router != "softmax" or moe.normalize_top_k or moe.routed_scaling != 1.0
                or moe.shared_d_ff or moe.n_experts < 2):
            raise ValueError("jamba MoE is SwiGLU experts (at least 2) with a softmax router, no top-k "
                             f"renormalisation, no scaling and no shared expert; got {moe}")
        d_ff.add(moe.d_ff)
        ep, eo = _find_period([k == "moe" for k in ffs],
                              (prev.get("expert_layer_period"), prev.get("expert_layer_offset")), "MoE layers")
        hf.update(num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, expert_layer_period=ep,
                  expert_layer_offset=eo, router_aux_loss_coef=moe.aux_loss_coef)
    else:
        hf.update(num_experts=1)  # every feed-forward is a plain MLP
    if len(d_ff) != 1:
        raise ValueError(f"jamba has one intermediate_size for MLPs and experts; got mlp/moe d_ff {sorted(d_ff)}")
    hf["intermediate_size"] = d_ff.pop()
    hf.pop("num_local_experts", None)
    return hf


def _jamba_mixer_rules(cfg: ModelConfig):
    def rules(hf: str, ours: str, kind: str) -> list:
        if kind == "attention":
            return _attention_rules(f"{hf}.self_attn", ours, cfg.attention)
        return mamba1_rules(f"{hf}.mamba", ours, cfg.mamba1)

    return rules


def _jamba_ff_rules(cfg: ModelConfig):
    def rules(hf: str, ours: str, kind: str) -> list:
        if kind == "mlp":
            return _mlp_rules(hf, ours, cfg.mlp)
        e = cfg.moe.n_experts
        fused = (SplitRule(f"{hf}.experts.gate_up_proj", (f"{ours}.gate_proj", f"{ours}.up_proj"), axis=1,
                           layout="experts"),
                 Rule(f"{hf}.experts.down_proj", f"{ours}.down_proj", "experts"))
        per_expert = tuple(StackRule(f"{hf}.experts.{{e}}.{name}.weight", f"{ours}.{name}", e, "linear")
                           for name in ("gate_proj", "up_proj", "down_proj"))
        return [*linear_rules(f"{hf}.router", f"{ours}.router", False), LayoutChoice((per_expert, fused))]

    return rules


def _jamba_rules(cfg: ModelConfig) -> list:
    return _decoder_pair_rules(cfg, _jamba_mixer_rules(cfg), _jamba_ff_rules(cfg),
                               embed="model.embed_tokens.weight", final_norm="model.final_layernorm.weight")


register(Family("jamba", "JambaForCausalLM", _jamba_from_hf, _jamba_to_hf, _jamba_rules))


# --- Nemotron-H -------------------------------------------------------------------------------------

_NEMOTRON_KINDS = {"linear_attention": "mamba2", "mamba": "mamba2", "full_attention": "attention",
                   "attention": "attention", "mlp": "mlp", "moe": "moe"}
_NEMOTRON_TYPES = {"mamba2": "linear_attention", "attention": "full_attention", "mlp": "mlp", "moe": "moe"}
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_NEMOTRON_ACTS = {"relu2": "relu2", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
#: legacy config keys that NemotronHConfig lets override the current ones: never write them back.
_NEMOTRON_LEGACY = ("mamba_n_groups", "mamba_d_conv", "mamba_expand", "mamba_dt_min", "mamba_dt_max",
                    "mamba_dt_limit", "mamba_dt_init_floor", "mamba_conv_bias", "mamba_chunk_size", "layer_types",
                    "mtp_hybrid_override_pattern")


def _nemotron_layer_types(hf: dict) -> list[str]:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None:
        pattern = hf.get("hybrid_override_pattern")
        if pattern is None:
            types = ["linear_attention", "moe", "full_attention", "mlp"]  # NemotronHConfig's default
        else:
            bad = sorted(set(pattern) - set(_PATTERN))
            if bad:
                raise ValueError(f"nemotron_h: hybrid_override_pattern={pattern!r} has unknown symbols {bad}")
            types = [_PATTERN[s] for s in pattern]
    bad = sorted(set(types) - set(_NEMOTRON_KINDS))
    if bad:
        raise ValueError(f"nemotron_h: unknown layers_block_type entries {bad}")
    return list(types)


def _nemotron_from_hf(hf: dict) -> ModelConfig:
    get = lambda key, legacy, default: hf.get(legacy, hf.get(key, default))
    if hf.get("moe_latent_size") is not None:
        raise _unsupported("nemotron_h", f"moe_latent_size={hf['moe_latent_size']} (latent MoE projections)")
    if hf.get("num_nextn_predict_layers", 0):
        raise _unsupported("nemotron_h", f"num_nextn_predict_layers={hf['num_nextn_predict_layers']} (multi-token "
                                         "prediction layers; transformers drops their mtp.* weights)")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        raise _unsupported("nemotron_h", f"mamba_hidden_act={hf['mamba_hidden_act']!r}")
    kinds = tuple(_NEMOTRON_KINDS[t] for t in _nemotron_layer_types(hf))
    d_model = hf.get("hidden_size", 4096)
    eps = hf.get("layer_norm_epsilon", 1e-5)
    act_name = hf.get("mlp_hidden_act", "relu2")
    if act_name not in _NEMOTRON_ACTS and {"mlp", "moe"} & set(kinds):
        raise _unsupported("nemotron_h", f"mlp_hidden_act={act_name!r} (supported: {sorted(_NEMOTRON_ACTS)})")
    act = _NEMOTRON_ACTS.get(act_name, "relu2")
    mlp_bias = hf.get("mlp_bias", False)
    if mlp_bias and "moe" in kinds:
        raise _unsupported("nemotron_h", "mlp_bias=True with MoE layers (the shared expert would carry biases)")
    shared = hf.get("moe_shared_expert_intermediate_size", 7688)
    if "moe" in kinds and not shared:
        raise _unsupported("nemotron_h", "moe_shared_expert_intermediate_size=0")
    m2 = Mamba2Config(n_heads=hf.get("mamba_num_heads", 128), head_dim=hf.get("mamba_head_dim", 64),
                      d_state=hf.get("ssm_state_size", 128), n_groups=get("n_groups", "mamba_n_groups", 8),
                      d_conv=get("conv_kernel", "mamba_d_conv", 4),
                      conv_bias=get("use_conv_bias", "mamba_conv_bias", True),
                      proj_bias=hf.get("use_bias", False), chunk_size=get("chunk_size", "mamba_chunk_size", 128),
                      # time_step_min / time_step_max only set dt_bias at initialisation (transformers
                      # >= 5.25, as NVIDIA's Megatron / mamba_ssm); earlier 5.x releases clamped dt at time_step_min
                      dt_limit=tuple(get("time_step_limit", "mamba_dt_limit", None) or (0.0, math.inf)),
                      norm_eps=eps)
    heads = hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim", 128)
    att = AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                          head_dim=head_dim if head_dim is not None else d_model // heads)
    mlp = MLPConfig(d_ff=hf.get("intermediate_size", 21504), activation=act, bias=mlp_bias)
    moe = None
    if "moe" in kinds:
        moe = MoEConfig(n_experts=hf.get("n_routed_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
                        d_ff=hf.get("moe_intermediate_size", 7688), activation=act, router="sigmoid",
                        normalize_top_k=hf.get("norm_topk_prob", True),
                        routed_scaling=float(hf.get("routed_scaling_factor", 1.0)), n_groups=hf.get("n_group", 1),
                        top_k_groups=hf.get("topk_group", 1), shared_d_ff=shared)
    return ModelConfig(vocab_size=hf.get("vocab_size", 131072), d_model=d_model, layers=kinds,
                       mamba2=m2 if "mamba2" in kinds else None, attention=att if "attention" in kinds else None,
                       mlp=mlp if "mlp" in kinds else None, moe=moe, norm_eps=eps,
                       # NemotronHForCausalLM never ties its head (no _tied_weights_keys), whatever the config says
                       tie_embeddings=False, model_type="nemotron_h", extra=hf)


def _nemotron_to_hf(cfg: ModelConfig) -> dict:
    kinds = set(cfg.layers)
    if not kinds <= set(_NEMOTRON_TYPES):
        raise ValueError("nemotron_h holds Mamba-2, attention, MLP and MoE layers, not "
                         f"{sorted(kinds - set(_NEMOTRON_TYPES))}")
    if cfg.tie_embeddings:
        raise ValueError("nemotron_h has an untied LM head (tie_embeddings=True cannot be expressed)")
    hf = _base_hf(cfg, "nemotron_h", "NemotronHForCausalLM")
    for key in _NEMOTRON_LEGACY:
        hf.pop(key, None)
    types = [_NEMOTRON_TYPES[k] for k in cfg.layers]
    symbol = {v: k for k, v in _PATTERN.items()}
    hf.update(layers_block_type=types, hybrid_override_pattern="".join(symbol[t] for t in types),  # older readers
              layer_norm_epsilon=cfg.norm_eps, moe_latent_size=None, num_nextn_predict_layers=0)
    if "mamba2" in kinds:
        m2 = cfg.mamba2
        _rms_eps_check(cfg, "nemotron_h", m2, "mamba2")
        hf.update(mamba_num_heads=m2.n_heads, mamba_head_dim=m2.head_dim, ssm_state_size=m2.d_state,
                  n_groups=m2.n_groups, conv_kernel=m2.d_conv, use_conv_bias=m2.conv_bias, use_bias=m2.proj_bias,
                  chunk_size=m2.chunk_size, time_step_limit=list(m2.dt_limit), mamba_hidden_act="silu")
        if m2.d_inner % cfg.d_model == 0:
            hf["expand"] = m2.d_inner // cfg.d_model  # informational: the mixer sizes from heads * head_dim
    if "attention" in kinds:
        att = cfg.attention
        if att.rope is not None or att.qkv_bias or att.out_bias:
            raise ValueError("nemotron_h attention has no positional encoding and no biases "
                             f"(attention.rope={att.rope}, qkv_bias={att.qkv_bias}, out_bias={att.out_bias})")
        hf.update(num_attention_heads=att.n_heads, num_key_value_heads=att.n_kv_heads, head_dim=att.head_dim,
                  attention_bias=False)
    acts = set()
    if "mlp" in kinds:
        mlp = cfg.mlp
        acts.add(mlp.activation)
        hf.update(intermediate_size=mlp.d_ff, mlp_bias=mlp.bias)
    if "moe" in kinds:
        moe = cfg.moe
        acts.add(moe.activation)
        if moe.router != "sigmoid" or moe.shared_d_ff <= 0:
            raise ValueError(f"nemotron_h MoE has a sigmoid router and a shared expert; got router={moe.router!r}, "
                             f"shared_d_ff={moe.shared_d_ff}")
        if "mlp" in kinds and cfg.mlp.bias:
            raise ValueError("nemotron_h: mlp.bias=True would give the MoE shared expert biases too")
        hf.update(n_routed_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.d_ff,
                  moe_shared_expert_intermediate_size=moe.shared_d_ff, n_shared_experts=1,
                  routed_scaling_factor=moe.routed_scaling, n_group=moe.n_groups, topk_group=moe.top_k_groups,
                  norm_topk_prob=moe.normalize_top_k)
        if "mlp" not in kinds:
            hf["mlp_bias"] = False
    inverse = {v: k for k, v in _NEMOTRON_ACTS.items()}
    if len(acts) > 1 or not acts <= set(inverse):
        raise ValueError(f"nemotron_h MLPs and experts share one non-gated activation "
                         f"({', '.join(sorted(inverse))}); got {sorted(acts)}")
    if acts:
        hf["mlp_hidden_act"] = inverse[acts.pop()]
    return hf


def _nemotron_rules(cfg: ModelConfig) -> list:
    rules = lm_rules(cfg, embed="backbone.embeddings.weight", final_norm="backbone.norm_f.weight",
                     layer_prefix="backbone.layers")
    for i, kind in enumerate(cfg.layers):
        hf, ours = f"backbone.layers.{i}.mixer", f"layers.{i}.mixer"
        if kind == "mamba2":
            rules += mamba2_rules(hf, ours, cfg.mamba2)
        elif kind == "attention":
            rules += _attention_rules(hf, ours, cfg.attention)
        elif kind == "mlp":
            rules += _mlp_rules(hf, ours, cfg.mlp)
        else:
            e = cfg.moe.n_experts
            fused = tuple(Rule(f"{hf}.experts.{name}", f"{ours}.{name}", "experts")
                          for name in ("up_proj", "down_proj"))
            per_expert = tuple(StackRule(f"{hf}.experts.{{e}}.{name}.weight", f"{ours}.{name}", e, "linear")
                               for name in ("up_proj", "down_proj"))
            rules += [*linear_rules(f"{hf}.gate", f"{ours}.router", False),
                      Rule(f"{hf}.gate.e_score_correction_bias", f"{ours}.e_score_correction_bias"),
                      LayoutChoice((per_expert, fused)),
                      *_mlp_rules(f"{hf}.shared_experts", f"{ours}.shared_expert",
                                  MLPConfig(d_ff=cfg.moe.shared_d_ff, activation=cfg.moe.activation))]
    # Checkpoints on disk name the base model "backbone" (transformers renames it "model" on load)
    return with_prefix_alias(rules, "backbone.", "model.")


register(Family("nemotron_h", "NemotronHForCausalLM", _nemotron_from_hf, _nemotron_to_hf, _nemotron_rules))


# --- Bamba ------------------------------------------------------------------------------------------

def _plain_rope(hf: dict, model_type: str) -> tuple[dict, float]:
    """The RoPE fields of a config and its base: transformers 5.x's ``rope_parameters`` (or the
    legacy ``rope_scaling``) first, then a top-level ``rope_theta``; only plain RoPE is supported."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _unsupported(model_type, f"rope_parameters rope_type={rope_type!r} (only plain RoPE)")
    return params, float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _bamba_rope(hf: dict) -> RopeConfig:
    """``partial_rotary_factor`` from the RoPE parameters, default 0.5 (a top-level one is ignored)."""
    params, theta = _plain_rope(hf, "bamba")
    return RopeConfig(theta=theta, fraction=float(params.get("partial_rotary_factor", 0.5)))


# Bamba and Granite 4.0 share transformers' Bamba Mamba-2 mixer and its ``mamba_*`` config fields, and
# one ``hidden_act`` for the mixer's conv and the MLP gates.

def _bamba_mixer_from_hf(hf: dict, model_type: str, eps: float) -> Mamba2Config:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(model_type, f"hidden_act={act!r} (it is both the Mamba conv activation and the "
                                       "MLP gate activation; only 'silu' is supported)")
    d_model = hf.get("hidden_size", 4096)
    n_heads = hf.get("mamba_n_heads", 128)
    expand = hf.get("mamba_expand", 2)
    d_head = hf.get("mamba_d_head", "auto")
    d_head = expand * d_model // n_heads if d_head == "auto" else d_head
    m2 = Mamba2Config(n_heads=n_heads, head_dim=d_head, d_state=hf.get("mamba_d_state", 256),
                      n_groups=hf.get("mamba_n_groups", 1), d_conv=hf.get("mamba_d_conv", 4),
                      conv_bias=hf.get("mamba_conv_bias", True), proj_bias=hf.get("mamba_proj_bias", False),
                      chunk_size=hf.get("mamba_chunk_size", 256),
                      dt_limit=tuple(hf.get("time_step_limit") or (0.0, math.inf)), norm_eps=eps)
    if m2.d_inner != int(expand * d_model):
        raise ValueError(f"{model_type}: mamba_n_heads * mamba_d_head = {m2.d_inner} != mamba_expand * hidden_size")
    return m2


def _bamba_mixer_to_hf(cfg: ModelConfig, hf: dict, mixers: tuple, model_type: str) -> None:
    """Write the ``mamba_*`` fields of ``cfg.mamba2`` into ``hf`` (placeholders the config's
    validation accepts when no layer is a Mamba layer)."""
    if "mamba2" in mixers:
        m2 = cfg.mamba2
        _rms_eps_check(cfg, model_type, m2, "mamba2")
        hf.update(mamba_n_heads=m2.n_heads, mamba_d_head=m2.head_dim, mamba_d_state=m2.d_state,
                  mamba_n_groups=m2.n_groups, mamba_d_conv=m2.d_conv, mamba_conv_bias=m2.conv_bias,
                  mamba_proj_bias=m2.proj_bias, mamba_chunk_size=m2.chunk_size,
                  mamba_expand=integer_ratio(m2.d_inner, cfg.d_model, "mamba2.d_inner as mamba_expand"),
                  time_step_limit=list(m2.dt_limit))
    elif "mamba_n_heads" not in hf:
        hf.update(mamba_n_heads=1, mamba_expand=2, mamba_d_head=2 * cfg.d_model)


def _bamba_from_hf(hf: dict) -> ModelConfig:
    d_model = hf.get("hidden_size", 4096)
    n = hf.get("num_hidden_layers", 32)
    attn_idx = set(hf.get("attn_layer_indices") or ())
    layers = tuple(k for i in range(n) for k in ("attention" if i in attn_idx else "mamba2", "mlp"))
    eps = hf.get("rms_norm_eps", 1e-5)
    m2 = _bamba_mixer_from_hf(hf, "bamba", eps)
    heads = hf.get("num_attention_heads", 32)
    bias = hf.get("attention_bias", False)
    att = AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                          head_dim=hf.get("head_dim") or d_model // heads, qkv_bias=bias, out_bias=bias,
                          rope=_bamba_rope(hf))
    mlp = MLPConfig(d_ff=hf.get("intermediate_size", 14336), activation="swiglu", bias=hf.get("mlp_bias", False))
    return ModelConfig(vocab_size=hf.get("vocab_size", 128000), d_model=d_model, layers=layers,
                       mamba2=m2 if "mamba2" in layers else None, attention=att if "attention" in layers else None,
                       mlp=mlp, norm_eps=eps, tie_embeddings=hf.get("tie_word_embeddings", False),
                       model_type="bamba", extra=hf)


def _bamba_to_hf(cfg: ModelConfig) -> dict:
    mixers, _ = _split_pairs(cfg, "bamba", {"mamba2", "attention"}, {"mlp"})
    hf = _base_hf(cfg, "bamba", "BambaForCausalLM")
    mlp = cfg.mlp
    if mlp.activation != "swiglu":
        raise ValueError(f"bamba MLPs are SwiGLU, not mlp.activation={mlp.activation!r}")
    hf.update(num_hidden_layers=len(mixers), rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              intermediate_size=mlp.d_ff, mlp_bias=mlp.bias,
              attn_layer_indices=[i for i, k in enumerate(mixers) if k == "attention"])
    _bamba_mixer_to_hf(cfg, hf, mixers, "bamba")
    if "attention" in mixers:
        att = cfg.attention
        if att.rope is None or att.qkv_bias != att.out_bias:
            raise ValueError("bamba attention always applies RoPE and has one attention_bias flag "
                             f"(attention.rope={att.rope}, qkv_bias={att.qkv_bias}, out_bias={att.out_bias})")
        for key in ("rope_scaling", "rope_theta", "partial_rotary_factor"):
            hf.pop(key, None)
        hf.update(num_attention_heads=att.n_heads, num_key_value_heads=att.n_kv_heads, attention_bias=att.qkv_bias,
                  rope_parameters={"rope_type": "default", "rope_theta": att.rope.theta,
                                   "partial_rotary_factor": att.rope.fraction})
        if att.head_dim != cfg.d_model // att.n_heads:
            hf["head_dim"] = att.head_dim
        else:
            hf.pop("head_dim", None)
    return hf


def _bamba_rules(cfg: ModelConfig) -> list:
    def mixer(hf: str, ours: str, kind: str) -> list:
        if kind == "attention":
            return _attention_rules(f"{hf}.self_attn", ours, cfg.attention)
        return mamba2_rules(f"{hf}.mamba", ours, cfg.mamba2)

    return _decoder_pair_rules(cfg, mixer, lambda hf, ours, kind: _mlp_rules(hf, ours, cfg.mlp),
                               embed="model.embed_tokens.weight", final_norm="model.final_layernorm.weight")


register(Family("bamba", "BambaForCausalLM", _bamba_from_hf, _bamba_to_hf, _bamba_rules))


# --- Granite 4.0 (GraniteMoeHybrid) -----------------------------------------------------------------

_GRANITE_KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention",
                  "full_attention": "attention"}


def _granite_from_hf(hf: dict) -> ModelConfig:
    d_model = hf.get("hidden_size", 4096)
    n = hf.get("num_hidden_layers", 32)
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * n
    bad = sorted(set(types) - set(_GRANITE_KINDS))
    if bad or len(types) != n:
        raise ValueError(f"granitemoehybrid: layer_types must name num_hidden_layers={n} layers as mamba or "
                         f"attention; got {len(types)} entries, unknown {bad}")
    n_experts = hf.get("num_local_experts", 8)
    shared = hf.get("shared_intermediate_size", 1024)
    if n_experts and not shared:
        raise _unsupported("granitemoehybrid", "shared_intermediate_size=0 with experts")
    ff = "moe" if n_experts else "mlp"
    layers = tuple(k for t in types for k in (_GRANITE_KINDS[t], ff))
    eps = hf.get("rms_norm_eps", 1e-6)
    m2 = _bamba_mixer_from_hf(hf, "granitemoehybrid", eps)
    heads = hf.get("num_attention_heads", 32)
    bias = hf.get("attention_bias", False)
    rope = None
    if hf.get("position_embedding_type") == "rope":  # "nope" or None: no positional encoding; whole heads
        rope = RopeConfig(theta=_plain_rope(hf, "granitemoehybrid")[1])
    att = AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                          head_dim=hf.get("head_dim") or d_model // heads, qkv_bias=bias, out_bias=bias, rope=rope,
                          scale=hf.get("attention_multiplier", 1.0))  # null: 1/sqrt(head_dim), as transformers
    moe = mlp = None
    if n_experts:
        moe = MoEConfig(n_experts=n_experts, top_k=hf.get("num_experts_per_tok", 2),
                        d_ff=hf.get("intermediate_size", 11008), activation="swiglu", router="softmax",
                        normalize_top_k=True, shared_d_ff=shared,
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    else:
        mlp = MLPConfig(d_ff=shared, activation="swiglu")
    return ModelConfig(vocab_size=hf.get("vocab_size", 32000), d_model=d_model, layers=layers,
                       mamba2=m2 if "mamba2" in layers else None, attention=att if "attention" in layers else None,
                       mlp=mlp, moe=moe, norm_eps=eps, tie_embeddings=hf.get("tie_word_embeddings", False),
                       embedding_multiplier=hf.get("embedding_multiplier", 1.0),
                       residual_multiplier=hf.get("residual_multiplier", 1.0),
                       logits_divisor=hf.get("logits_scaling", 1.0), model_type="granitemoehybrid", extra=hf)


def _granite_to_hf(cfg: ModelConfig) -> dict:
    mixers, ffs = _split_pairs(cfg, "granitemoehybrid", {"mamba2", "attention"}, {"mlp", "moe"})
    if len(set(ffs)) != 1:
        raise ValueError("granitemoehybrid has the same feed-forward (MoE plus shared MLP, or the shared MLP alone) "
                         f"in every decoder layer; got {sorted(set(ffs))}")
    hf = _base_hf(cfg, "granitemoehybrid", "GraniteMoeHybridForCausalLM", mup_scalars=True)
    hf.pop("layers_block_type", None)
    hf.update(num_hidden_layers=len(mixers), rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              layer_types=["mamba" if k == "mamba2" else "attention" for k in mixers],  # IBM's names: every reader
              embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
              logits_scaling=cfg.logits_divisor)
    _bamba_mixer_to_hf(cfg, hf, mixers, "granitemoehybrid")
    if "attention" in mixers:
        att = cfg.attention
        if att.qkv_bias != att.out_bias:
            raise ValueError("granitemoehybrid attention has one attention_bias flag "
                             f"(attention.qkv_bias={att.qkv_bias}, attention.out_bias={att.out_bias})")
        if att.rope is not None and att.rope.fraction != 1.0:
            raise ValueError(f"granitemoehybrid rotates whole heads, not attention.rope.fraction={att.rope.fraction}")
        for key in ("rope_scaling", "rope_parameters", "rope_theta"):
            hf.pop(key, None)
        hf.update(num_attention_heads=att.n_heads, num_key_value_heads=att.n_kv_heads, attention_bias=att.qkv_bias,
                  attention_multiplier=att.softmax_scale,
                  position_embedding_type="nope" if att.rope is None else "rope")
        if att.head_dim != cfg.d_model // att.n_heads:
            hf["head_dim"] = att.head_dim
        else:
            hf.pop("head_dim", None)
        if att.rope is not None:  # rope_theta too: transformers 4.x reads only that
            hf.update(rope_parameters={"rope_type": "default", "rope_theta": att.rope.theta}, rope_theta=att.rope.theta)
    if ffs[0] == "moe":
        moe = cfg.moe
        wrong = {f"moe.{name}": getattr(moe, name) for name, ok in (
            ("activation", moe.activation == "swiglu"), ("router", moe.router == "softmax"),
            ("normalize_top_k", moe.normalize_top_k), ("routed_scaling", moe.routed_scaling == 1.0),
            ("shared_d_ff", moe.shared_d_ff > 0), ("n_groups", moe.n_groups == 1)) if not ok}
        if wrong:
            raise ValueError("granitemoehybrid MoE is SwiGLU experts with a softmax router renormalised over the "
                             f"top k, no scaling or expert groups, and a shared SwiGLU expert; got {wrong}")
        hf.update(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k, intermediate_size=moe.d_ff,
                  shared_intermediate_size=moe.shared_d_ff, router_aux_loss_coef=moe.aux_loss_coef)
    else:
        mlp = cfg.mlp
        if mlp.activation != "swiglu" or mlp.bias:
            raise ValueError(f"granitemoehybrid MLPs are SwiGLU without bias (mlp.activation={mlp.activation!r}, "
                             f"mlp.bias={mlp.bias})")
        hf.update(num_local_experts=0, shared_intermediate_size=mlp.d_ff)
    return hf


def _granite_shared_mlp_rules(hf: str, ours: str) -> list:
    """``shared_mlp``: ``input_linear`` holds the gate then the up projection, ``(2 d_ff, d)``."""
    return [SplitRule(f"{hf}.input_linear.weight", (f"{ours}.gate_proj.kernel", f"{ours}.up_proj.kernel"), axis=0,
                      layout="linear"),
            Rule(f"{hf}.output_linear.weight", f"{ours}.down_proj.kernel", "linear")]


def _granite_rules(cfg: ModelConfig) -> list:
    def mixer(hf: str, ours: str, kind: str) -> list:
        if kind == "attention":
            return _attention_rules(f"{hf}.self_attn", ours, cfg.attention)
        return mamba2_rules(f"{hf}.mamba", ours, cfg.mamba2)

    def ff(hf: str, ours: str, kind: str) -> list:
        if kind == "mlp":
            return _granite_shared_mlp_rules(f"{hf}.shared_mlp", ours)
        moe = f"{hf}.block_sparse_moe"

        def experts(gate_up: str, down: str):
            return (SplitRule(f"{moe}.{gate_up}", (f"{ours}.gate_proj", f"{ours}.up_proj"), axis=1, layout="experts"),
                    Rule(f"{moe}.{down}", f"{ours}.down_proj", "experts"))

        on_disk = (Rule(f"{moe}.router.layer.weight", f"{ours}.router.kernel", "linear"),
                   *experts("input_linear.weight", "output_linear.weight"))
        in_memory = (Rule(f"{moe}.router.weight", f"{ours}.router.kernel", "linear"),  # transformers 5.x modules
                     *experts("experts.gate_up_proj", "experts.down_proj"))
        shared = _granite_shared_mlp_rules(f"{hf}.shared_mlp", f"{ours}.shared_expert")
        return [LayoutChoice((on_disk, in_memory)), *shared]

    return _decoder_pair_rules(cfg, mixer, ff, embed="model.embed_tokens.weight", final_norm="model.norm.weight",
                               ff_norm="post_attention_layernorm", ff_module="")


register(Family("granitemoehybrid", "GraniteMoeHybridForCausalLM", _granite_from_hf, _granite_to_hf, _granite_rules))
