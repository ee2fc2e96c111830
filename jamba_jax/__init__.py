"""jamba_jax: Mamba-1, Mamba-2 and hybrid (Jamba, Mamba-2-Hybrid / Nemotron-H, Bamba, Granite 4.0-H) LMs in JAX."""

from jamba_jax.config import (AttentionConfig, Mamba1Config, Mamba2Config, MLPConfig, ModelConfig, MoEConfig,
                              RopeConfig, jamba_layers, layers_from_pattern)
from jamba_jax.convert import from_pretrained, save_pretrained
from jamba_jax.model import LanguageModel
from jamba_jax.generate import generate  # the function; `from jamba_jax.generate import X` for the rest

__all__ = ["AttentionConfig", "LanguageModel", "Mamba1Config", "Mamba2Config", "MLPConfig", "ModelConfig",
           "MoEConfig", "RopeConfig", "from_pretrained", "generate", "jamba_layers", "layers_from_pattern",
           "save_pretrained"]
