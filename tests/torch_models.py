"""Small random transformers models for parity tests (torch is the numerics oracle)."""

from __future__ import annotations

import numpy as np
import torch

PERTURBED = ("A_log", "D", "dt_bias", "dt_proj.bias", "norm.weight", "norm_f.weight", "layernorm.weight",
             "norm_weight", "final_layernorm.weight", "input_layernorm.weight", "pre_ff_layernorm.weight")
PERTURBED_BUFFERS = ("e_score_correction_bias",)


def random_torch_model(config, seed: int = 0):
    """A transformers causal LM from ``config`` with random weights, SSM parameters and norm weights
    moved off their init (so a test cannot pass by ignoring them)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(PERTURBED) or name.split(".")[-1] in ("A_log", "D", "dt_bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith(PERTURBED_BUFFERS):  # zeros at init: a test ignoring them would still pass
                b.add_(0.1 * torch.randn_like(b))
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()
