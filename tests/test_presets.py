"""Presets: parameter counts equal transformers' (meta device), configs validate, compile time."""

import time

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

from jamba_jax.config import (AttentionConfig, Mamba1Config, MLPConfig, ModelConfig, MoEConfig, jamba_layers,
                              layers_from_pattern)
from jamba_jax.convert import FAMILIES
from jamba_jax.model import LanguageModel
from jamba_jax.params import count_params
from jamba_jax.presets import derivation, load_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_equals_transformers_meta_model(name):
    cfg = load_preset(name)
    if cfg.model_type not in FAMILIES:
        pytest.skip(f"{name} is our own architecture ({cfg.model_type}); transformers has no twin")
    hf = FAMILIES[cfg.model_type].config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert count_params(cfg) == sum(p.numel() for p in torch_model.parameters())


def test_mamba2_hybrid_8b_layout_and_derivation():
    cfg = load_preset("mamba2-hybrid-8b")
    assert cfg.n_layers == 56
    assert (cfg.layers.count("mamba2"), cfg.layers.count("attention"), cfg.layers.count("mlp")) == (24, 4, 28)
    text = derivation(cfg)
    assert f"{count_params(cfg):,}" in text.splitlines()[-1]


def test_active_parameters_count_top_k_experts():
    cfg = load_preset("jamba-v0.1")
    per_expert = 3 * cfg.d_model * cfg.moe.d_ff
    n_moe = cfg.layers.count("moe")
    assert count_params(cfg) - count_params(cfg, active=True) == n_moe * (cfg.moe.n_experts - cfg.moe.top_k) * per_expert


@pytest.mark.parametrize("build, message", [
    (lambda: layers_from_pattern("M-X*"), r"pattern\[2\]='X'"),
    (lambda: jamba_layers(30, attn_period=8, attn_offset=4, expert_period=2, expert_offset=1),
     r"attn_layer_period=8: must divide num_layers=30"),
    (lambda: AttentionConfig(n_heads=6, n_kv_heads=4, head_dim=8), r"attention.n_kv_heads=4"),
    (lambda: MoEConfig(n_experts=4, top_k=5, d_ff=8), r"moe.top_k=5"),
    (lambda: ModelConfig(vocab_size=8, d_model=4, layers=("mamba1", "moe"), mamba1=Mamba1Config(8)),
     r"moe=None"),
    (lambda: AttentionConfig(n_heads=2, n_kv_heads=1, head_dim=8, scale=-0.1), r"attention.scale=-0.1"),
    (lambda: ModelConfig(vocab_size=8, d_model=4, layers=("mamba1",), mamba1=Mamba1Config(8), logits_divisor=0),
     r"logits_divisor=0"),
    (lambda: ModelConfig(vocab_size=8, d_model=4, layers=("mamba1",), mamba1=Mamba1Config(8),
                         embedding_multiplier=float("nan")), r"embedding_multiplier=nan"),
    (lambda: Mamba1Config(8, dt_rank=-1), r"mamba1.dt_rank=-1"),
    (lambda: MoEConfig(n_experts=4, top_k=2, d_ff=8, n_groups=0), r"moe.n_groups=0"),
    (lambda: MoEConfig(n_experts=8, top_k=3, d_ff=8, router="sigmoid", n_groups=4, top_k_groups=1), r"moe.top_k=3"),
    (lambda: MoEConfig(n_experts=4, top_k=2, d_ff=8, shared_d_ff=-1), r"moe.shared_d_ff=-1"),
    (lambda: LanguageModel(ModelConfig(vocab_size=8, d_model=4, layers=("mamba1",), mamba1=Mamba1Config(8)),
                           rngs=nnx.Rngs(0), impl="bogus"), r"impl='bogus'"),
])
def test_bad_configs_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_compile_32_layer_jamba_pattern_forward_backward_quickly():
    """The stack scans over its repeating period, so compile time does not grow with depth."""
    cfg = ModelConfig(
        vocab_size=64, d_model=16,
        layers=jamba_layers(32, attn_period=8, attn_offset=4, expert_period=2, expert_offset=1),
        mamba1=Mamba1Config(d_inner=32, d_state=4, bcdt_norm="weighted"),
        attention=AttentionConfig(n_heads=2, n_kv_heads=1, head_dim=8), mlp=MLPConfig(d_ff=32),
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=32))
    assert cfg.period == 16 and cfg.n_layers == 64
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.ones((2, 32), jnp.int32)

    def loss(params):
        logits, aux = nnx.merge(graphdef, params)(ids, return_aux=True)
        return jnp.mean(logits ** 2) + aux["load_balancing_loss"]

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    seconds = time.perf_counter() - start
    print(f"compile forward+backward of a 32-layer Jamba-pattern model: {seconds:.1f} s")
    assert seconds < 60
