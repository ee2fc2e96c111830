"""Mamba, FalconMamba and Mamba-2 LMs against transformers' PyTorch models."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jamba_jax
from tests.helpers import rel_l2
from tests.torch_models import random_torch_model, torch_logits

CONFIGS = {
    "mamba": lambda: transformers.MambaConfig(vocab_size=97, hidden_size=36, state_size=8, num_hidden_layers=3,
                                              expand=2, conv_kernel=4, time_step_rank=5, use_bias=True,
                                              tie_word_embeddings=True),
    "falcon_mamba": lambda: transformers.FalconMambaConfig(vocab_size=97, hidden_size=24, state_size=8,
                                                           num_hidden_layers=2, expand=3, tie_word_embeddings=False,
                                                           mixer_rms_eps=1e-5),
    "mamba2": lambda: transformers.Mamba2Config(vocab_size=101, hidden_size=24, num_heads=6, head_dim=8,
                                                state_size=16, n_groups=3, expand=2, num_hidden_layers=3,
                                                chunk_size=16, tie_word_embeddings=False),
    "mamba2_one_group": lambda: transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_heads=4, head_dim=16,
                                                          state_size=8, n_groups=1, expand=2, num_hidden_layers=2,
                                                          chunk_size=8, tie_word_embeddings=True,
                                                          time_step_limit=(0.01, 0.5)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch_model = random_torch_model(CONFIGS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path)
    return torch_model, path


def _ids(vocab, b=2, l=37, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, l))


def test_logits_match_transformers_float32(checkpoint):
    torch_model, path = checkpoint
    model = jamba_jax.from_pretrained(path)
    ids = _ids(model.config.vocab_size)
    assert rel_l2(model(jnp.asarray(ids)), torch_logits(torch_model, ids)) < 1e-4


def test_logits_bfloat16_activations(checkpoint):
    torch_model, path = checkpoint
    model = jamba_jax.from_pretrained(path, dtype=jnp.bfloat16)
    ids = _ids(model.config.vocab_size)
    assert rel_l2(np.asarray(model(jnp.asarray(ids)), np.float32), torch_logits(torch_model, ids)) < 2e-2


def test_save_pretrained_round_trips_through_transformers(checkpoint, tmp_path):
    torch_model, path = checkpoint
    model = jamba_jax.from_pretrained(path)
    jamba_jax.save_pretrained(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(reloaded) is type(torch_model)
    ids = _ids(model.config.vocab_size, l=19)
    assert rel_l2(torch_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids)))) < 1e-5


def test_packed_segments_equal_separate_runs(checkpoint):
    _, path = checkpoint
    model = jamba_jax.from_pretrained(path)
    lengths = [5, 11, 1, 20]  # boundaries inside chunks, one single-token document
    ids = _ids(model.config.vocab_size, b=1, l=sum(lengths))
    seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None]
    packed = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
    start = 0
    for n in lengths:
        alone = np.asarray(model(jnp.asarray(ids[:, start:start + n])))
        assert rel_l2(packed[:, start:start + n], alone) < 1e-4
        start += n


@pytest.mark.parametrize("limit", [(0.0, 0.01), (2.0, 3.0)])
def test_dt_limit_matches_transformers_where_it_binds(limit, tmp_path):
    """With dt_bias = 1, D = 0 and a large out_proj the SSM path dominates the logits, so a clamp of dt
    that is ignored (or applied wrongly) shows far above the parity tolerance."""
    import torch

    def build(time_step_limit):
        cfg = transformers.Mamba2Config(vocab_size=40, hidden_size=16, num_heads=4, head_dim=8, state_size=4,
                                        n_groups=1, expand=2, num_hidden_layers=1, chunk_size=8,
                                        time_step_limit=time_step_limit)
        model = random_torch_model(cfg)
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.dt_bias.fill_(1.0)
                layer.mixer.D.zero_()
                layer.mixer.out_proj.weight.mul_(10)
        return model

    ids = _ids(40, l=19)
    clamped, free = build(limit), build((0.0, float("inf")))
    assert rel_l2(torch_logits(clamped, ids), torch_logits(free, ids)) > 1e-2   # the limit binds
    clamped.save_pretrained(tmp_path)
    ours = jamba_jax.from_pretrained(tmp_path)(jnp.asarray(ids))
    assert rel_l2(ours, torch_logits(clamped, ids)) < 1e-4
