"""Model families we read and write: config translation and weight rules for each ``model_type``.

Each family turns a checkpoint's config.json into a `ModelConfig`, back again, and lists the
`Rule`s between checkpoint tensor names and our flat parameter names (`jamba_jax.params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from jamba_jax.config import MUP_SCALARS, Mamba1Config, Mamba2Config, ModelConfig
from jamba_jax.convert.rules import Rule, linear_rules, mamba1_rules, mamba2_rules


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))} "
                         "(and mamba_ssm's own layout: config.json with d_model/n_layer/ssm_cfg)")
    return FAMILIES[model_type]


def integer_ratio(num: int, den: int, what: str) -> int:
    if num % den:
        raise ValueError(f"cannot express {what}: {num} is not a multiple of {den}")
    return num // den


def lm_rules(cfg: ModelConfig, *, embed: str, final_norm: str, layer_prefix: str, norm_name: str = "norm",
             mixer_name: str = "mixer") -> list[Rule]:
    """Rules for the embedding, head and per-layer norm; the mixers' rules come from the family."""
    rules = [Rule(embed, "embed.embedding"), Rule(final_norm, "final_norm.weight")]
    if not cfg.tie_embeddings:
        rules += linear_rules("lm_head", "lm_head", False)
    rules += [Rule(f"{layer_prefix}.{i}.{norm_name}.weight", f"layers.{i}.norm.weight") for i in range(cfg.n_layers)]
    return rules


# source config fields a saved checkpoint must not repeat: remote code it does not ship, a
# quantisation it does not have, the source's dtype (save_pretrained sets its own)
_NOT_CARRIED = ("auto_map", "quantization_config", "dtype", "torch_dtype")


def _check_silu(hf: dict) -> None:
    """Mamba layers here gate and activate with SiLU; refuse a config that says otherwise."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{hf['model_type']}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")


def _base_hf(cfg: ModelConfig, model_type: str, architecture: str, *, mup_scalars: bool = False) -> dict:
    """The config.json fields every family shares, on top of the source config's (same model type).
    Families without muP scalars (all but Granite: ``mup_scalars=False``) refuse configs that use them."""
    if not mup_scalars:
        used = {name: getattr(cfg, name) for name in MUP_SCALARS if getattr(cfg, name) != 1.0}
        att = cfg.attention
        if att is not None and not math.isclose(att.softmax_scale, att.head_dim ** -0.5):
            used["attention.scale"] = att.scale
        if used:
            raise ValueError(f"{model_type} cannot express {used} (only granitemoehybrid has these scalars)")
    extra = dict(cfg.extra) if cfg.extra.get("model_type") == model_type else {}
    for key in _NOT_CARRIED:
        extra.pop(key, None)
    extra.update(model_type=model_type, architectures=[architecture], vocab_size=cfg.vocab_size,
                 hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                 tie_word_embeddings=cfg.tie_embeddings)
    return extra


# --- Mamba-1 and FalconMamba ----------------------------------------------------------------------

def _mamba_from_hf(hf: dict) -> ModelConfig:
    _check_silu(hf)
    falcon = hf["model_type"] == "falcon_mamba"
    d_model = hf.get("hidden_size", 768)
    rank = hf.get("time_step_rank", "auto")
    m1 = Mamba1Config(
        d_inner=int(hf.get("expand", 2) * d_model), d_state=hf.get("state_size", 16),
        d_conv=hf.get("conv_kernel", 4), dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank),
        conv_bias=hf.get("use_conv_bias", True), proj_bias=hf.get("use_bias", False),
        bcdt_norm="weightless" if falcon else None, norm_eps=hf.get("mixer_rms_eps", 1e-6))
    return ModelConfig(vocab_size=hf.get("vocab_size", 50280), d_model=d_model,
                       layers=("mamba1",) * hf.get("num_hidden_layers", 32), mamba1=m1,
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=hf.get("tie_word_embeddings", True),
                       residual_in_fp32=hf.get("residual_in_fp32", True), model_type=hf["model_type"], extra=hf)


def _mamba_to_hf(model_type: str, architecture: str):
    def to_hf(cfg: ModelConfig) -> dict:
        m1 = cfg.mamba1
        if set(cfg.layers) != {"mamba1"}:
            raise ValueError(f"{model_type} checkpoints hold only Mamba-1 layers, not {sorted(set(cfg.layers))}")
        if (m1.bcdt_norm == "weightless") != (model_type == "falcon_mamba"):
            raise ValueError(f"{model_type} does not match mamba1.bcdt_norm={m1.bcdt_norm!r}")
        hf = _base_hf(cfg, model_type, architecture)
        hf.update(state_size=m1.d_state, expand=integer_ratio(m1.d_inner, cfg.d_model, "mamba1.d_inner as expand"),
                  intermediate_size=m1.d_inner, conv_kernel=m1.d_conv, use_bias=m1.proj_bias,
                  use_conv_bias=m1.conv_bias, time_step_rank=m1.dt_rank, layer_norm_epsilon=cfg.norm_eps,
                  residual_in_fp32=cfg.residual_in_fp32, hidden_act="silu")
        if model_type == "falcon_mamba":
            hf["mixer_rms_eps"] = m1.norm_eps
        return hf

    return to_hf


def _mamba_rules(cfg: ModelConfig) -> list[Rule]:
    rules = lm_rules(cfg, embed="backbone.embeddings.weight", final_norm="backbone.norm_f.weight",
                     layer_prefix="backbone.layers")
    for i in range(cfg.n_layers):
        rules += mamba1_rules(f"backbone.layers.{i}.mixer", f"layers.{i}.mixer", cfg.mamba1)
    return rules


register(Family("mamba", "MambaForCausalLM", _mamba_from_hf, _mamba_to_hf("mamba", "MambaForCausalLM"),
                _mamba_rules))
register(Family("falcon_mamba", "FalconMambaForCausalLM", _mamba_from_hf,
                _mamba_to_hf("falcon_mamba", "FalconMambaForCausalLM"), _mamba_rules))


# --- Mamba-2 --------------------------------------------------------------------------------------

def _mamba2_from_hf(hf: dict) -> ModelConfig:
    _check_silu(hf)
    d_model = hf.get("hidden_size", 4096)
    eps = hf.get("layer_norm_epsilon", 1e-5)
    m2 = Mamba2Config(n_heads=hf.get("num_heads", 128), head_dim=hf.get("head_dim", 64),
                      d_state=hf.get("state_size", 128), n_groups=hf.get("n_groups", 8),
                      d_conv=hf.get("conv_kernel", 4), conv_bias=hf.get("use_conv_bias", True),
                      proj_bias=hf.get("use_bias", False), chunk_size=hf.get("chunk_size", 256),
                      dt_limit=tuple(hf.get("time_step_limit", (0.0, math.inf))), norm_eps=eps)
    if m2.d_inner != hf.get("expand", 2) * d_model:
        raise ValueError(f"mamba2 config: num_heads*head_dim={m2.d_inner} != expand*hidden_size")
    return ModelConfig(vocab_size=hf.get("vocab_size", 32768), d_model=d_model,
                       layers=("mamba2",) * hf.get("num_hidden_layers", 64), mamba2=m2, norm_eps=eps,
                       tie_embeddings=hf.get("tie_word_embeddings", False),
                       residual_in_fp32=hf.get("residual_in_fp32", True), model_type="mamba2", extra=hf)


def _mamba2_to_hf(cfg: ModelConfig) -> dict:
    m2 = cfg.mamba2
    if set(cfg.layers) != {"mamba2"}:
        raise ValueError(f"mamba2 checkpoints hold only Mamba-2 layers, not {sorted(set(cfg.layers))}")
    if m2.norm_eps != cfg.norm_eps:
        raise ValueError("mamba2 checkpoints share one epsilon: mamba2.norm_eps must equal norm_eps")
    hf = _base_hf(cfg, "mamba2", "Mamba2ForCausalLM")
    hf.update(num_heads=m2.n_heads, head_dim=m2.head_dim, state_size=m2.d_state, n_groups=m2.n_groups,
              expand=integer_ratio(m2.d_inner, cfg.d_model, "mamba2.d_inner as expand"), conv_kernel=m2.d_conv,
              use_bias=m2.proj_bias, use_conv_bias=m2.conv_bias, chunk_size=m2.chunk_size,
              time_step_limit=list(m2.dt_limit), layer_norm_epsilon=cfg.norm_eps,
              residual_in_fp32=cfg.residual_in_fp32, hidden_act="silu")
    return hf


def _mamba2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = lm_rules(cfg, embed="backbone.embeddings.weight", final_norm="backbone.norm_f.weight",
                     layer_prefix="backbone.layers")
    for i in range(cfg.n_layers):
        rules += mamba2_rules(f"backbone.layers.{i}.mixer", f"layers.{i}.mixer", cfg.mamba2)
    return rules


register(Family("mamba2", "Mamba2ForCausalLM", _mamba2_from_hf, _mamba2_to_hf, _mamba2_rules))


# --- mamba_ssm's own layout (MambaLMHeadModel: config.json with d_model / n_layer / ssm_cfg) --------

# mamba_ssm Mamba2 options (ssm_cfg) that change the layer in ways ours does not express, with
# the only value supported
MAMBA_SSM_MAMBA2_FIXED = (("d_ssm", None), ("norm_before_gate", False), ("D_has_hdim", False), ("rmsnorm", True))


def is_mamba_ssm_config(hf: dict) -> bool:
    return "model_type" not in hf and {"d_model", "n_layer"} <= set(hf)


def mamba_ssm_config(hf: dict) -> tuple[ModelConfig, list[Rule]]:
    """Config and rules for a mamba_ssm ``MambaLMHeadModel`` checkpoint (pure Mamba-1 or Mamba-2)."""
    if hf.get("attn_layer_idx") or hf.get("d_intermediate", 0):
        raise ValueError("mamba_ssm checkpoints with attention or MLP layers are not supported; "
                         "convert them to a transformers model_type (nemotron_h, bamba) first")
    ssm = dict(hf.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    d_model, n_layer = hf["d_model"], hf["n_layer"]
    multiple = hf.get("pad_vocab_size_multiple", 8)
    vocab = hf.get("vocab_size", 50277)
    vocab += (-vocab) % multiple
    common = dict(vocab_size=vocab, d_model=d_model, norm_eps=hf.get("norm_epsilon", 1e-5),
                  tie_embeddings=hf.get("tie_embeddings", True), residual_in_fp32=hf.get("residual_in_fp32", True))
    d_inner = ssm.get("expand", 2) * d_model
    if layer == "Mamba2":
        for name, only in MAMBA_SSM_MAMBA2_FIXED:
            if ssm.get(name, only) != only:
                raise ValueError(f"mamba_ssm Mamba2: ssm_cfg.{name}={ssm[name]!r} is not supported (only {only!r})")
        head_dim = ssm.get("headdim", 64)
        m2 = Mamba2Config(n_heads=d_inner // head_dim, head_dim=head_dim, d_state=ssm.get("d_state", 128),
                          n_groups=ssm.get("ngroups", 1), d_conv=ssm.get("d_conv", 4),
                          conv_bias=ssm.get("conv_bias", True), proj_bias=ssm.get("bias", False),
                          chunk_size=ssm.get("chunk_size", 256),
                          dt_limit=tuple(ssm.get("dt_limit", (0.0, math.inf))), norm_eps=1e-5)
        cfg = ModelConfig(layers=("mamba2",) * n_layer, mamba2=m2, model_type="mamba2", **common)
        mixer = lambda i: mamba2_rules(f"backbone.layers.{i}.mixer", f"layers.{i}.mixer", m2)
    elif layer == "Mamba1":
        rank = ssm.get("dt_rank", "auto")
        m1 = Mamba1Config(d_inner=d_inner, d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4),
                          dt_rank=math.ceil(d_model / 16) if rank == "auto" else int(rank),
                          conv_bias=ssm.get("conv_bias", True), proj_bias=ssm.get("bias", False))
        cfg = ModelConfig(layers=("mamba1",) * n_layer, mamba1=m1, model_type="mamba", **common)
        mixer = lambda i: mamba1_rules(f"backbone.layers.{i}.mixer", f"layers.{i}.mixer", m1)
    else:
        raise ValueError(f"mamba_ssm ssm_cfg.layer={layer!r} is not supported (Mamba1 or Mamba2)")
    rules = lm_rules(cfg, embed="backbone.embedding.weight", final_norm="backbone.norm_f.weight",
                     layer_prefix="backbone.layers")
    for i in range(n_layer):
        rules += mixer(i)
    return cfg, rules
