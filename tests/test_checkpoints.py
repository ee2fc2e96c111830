"""Checkpoint formats and bad input: mamba_ssm's layout, sharded safetensors, clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jamba_jax
from jamba_jax.convert.io import read_tensors, write_checkpoint
from tests.helpers import rel_l2
from tests.torch_models import random_torch_model, torch_logits


@pytest.fixture(scope="module")
def mamba2_torch():
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=32, num_heads=4, head_dim=16, state_size=8,
                                    n_groups=2, num_hidden_layers=2, chunk_size=8, tie_word_embeddings=True)
    return random_torch_model(cfg)


def test_mamba_ssm_layout_bin(mamba2_torch, tmp_path):
    """mamba_ssm's MambaLMHeadModel layout: d_model/n_layer/ssm_cfg, padded vocab, pytorch_model.bin."""
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in mamba2_torch.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # mamba_ssm saves the tied head too
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "d_intermediate": 0, "vocab_size": 90, "pad_vocab_size_multiple": 8,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True}))
    model = jamba_jax.from_pretrained(tmp_path)
    assert model.config.vocab_size == 96
    ids = np.random.default_rng(0).integers(0, 90, size=(2, 21))
    assert rel_l2(model(jnp.asarray(ids)), torch_logits(mamba2_torch, ids)) < 1e-4


def test_sharded_safetensors_round_trip(mamba2_torch, tmp_path):
    model = jamba_jax.from_pretrained(_save(mamba2_torch, tmp_path / "src"))
    tensors = read_tensors(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    write_checkpoint(tmp_path / "sharded", config, tensors, max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    again = jamba_jax.from_pretrained(tmp_path / "sharded")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(1, 9)))
    np.testing.assert_array_equal(model(ids), again(ids))


def test_saving_over_a_sharded_checkpoint_replaces_it(mamba2_torch, tmp_path):
    """No shard or index of the old checkpoint survives to be read instead of the new weights;
    the config names the saved dtype for every transformers release and drops remote code."""
    mamba2_torch.save_pretrained(tmp_path, max_shard_size="20KB")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_mamba2.Mamba2Config"}   # code we do not ship
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = jamba_jax.from_pretrained(tmp_path)
    model.final_norm.weight[...] = model.final_norm.weight[...] * 3.0
    jamba_jax.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    weights = [p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin") or "index" in p.name]
    assert weights == ["model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16" and "auto_map" not in saved
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(1, 9)))
    want = jamba_jax.from_pretrained(tmp_path)(ids)
    assert rel_l2(want, model(ids)) < 1e-2                      # bf16 weights
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.dtype == torch.bfloat16
    assert rel_l2(torch_logits(reloaded.float(), np.asarray(ids)), want) < 1e-5


def test_mamba_ssm_mamba2_options_we_cannot_express_raise(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "vocab_size": 96,
        "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "norm_before_gate": True}}))
    with pytest.raises(ValueError, match="norm_before_gate"):
        jamba_jax.from_pretrained(tmp_path)


def _save(torch_model, path):
    torch_model.save_pretrained(path)
    return path


def test_unknown_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*mamba2"):
        jamba_jax.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_listed(mamba2_torch, tmp_path):
    path = _save(mamba2_torch, tmp_path)
    tensors = read_tensors(path)
    config = json.loads((path / "config.json").read_text())
    del tensors["backbone.layers.1.mixer.D"]
    tensors["backbone.layers.0.mixer.A_log"] = np.zeros(5, np.float32)
    tensors["backbone.layers.0.mixer.extra"] = np.zeros(3, np.float32)
    (path / "model.safetensors").unlink()
    write_checkpoint(path, config, tensors)
    with pytest.raises(ValueError) as err:
        jamba_jax.from_pretrained(path)
    msg = str(err.value)
    assert "missing: backbone.layers.1.mixer.D (4,)" in msg
    assert "mis-shaped: backbone.layers.0.mixer.A_log: expected (4,), found (5,)" in msg
    assert "unexpected: backbone.layers.0.mixer.extra (3,)" in msg


def test_out_of_vocabulary_ids_raise(mamba2_torch, tmp_path):
    model = jamba_jax.from_pretrained(_save(mamba2_torch, tmp_path))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        model(jnp.asarray([[1, 2, 96]]))
    with pytest.raises(ValueError, match="token ids"):
        model(jnp.asarray([[-1, 2]]))


def test_bin_files_never_unpickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_tensors(tmp_path)
