"""jamba_jax.compare: float32 agreement for every model type we load, and a failing exit code that
points at the right layer when one tensor of our side's weights is perturbed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jamba_jax.compare import HIDDEN_STATES_LAYOUT, compare, format_report, main
from jamba_jax.convert import FAMILIES
from tests.torch_models import random_torch_model

HYBRIDS_MISSING = ("jamba_jax/convert/hybrids.py (the jamba, nemotron_h, bamba and granitemoehybrid families) is not "
                   "committed: from_pretrained cannot load model_type {!r}")

CONFIGS = {
    "mamba": lambda: transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=3,
                                              expand=2, time_step_rank=5, use_bias=True, tie_word_embeddings=True),
    "falcon_mamba": lambda: transformers.FalconMambaConfig(vocab_size=97, hidden_size=24, state_size=8,
                                                           num_hidden_layers=2, expand=3, tie_word_embeddings=False,
                                                           mixer_rms_eps=1e-5),
    "mamba2": lambda: transformers.Mamba2Config(vocab_size=101, hidden_size=24, num_heads=6, head_dim=8,
                                                state_size=16, n_groups=3, expand=2, num_hidden_layers=3,
                                                chunk_size=16, tie_word_embeddings=False),
    "jamba": lambda: transformers.JambaConfig(
        vocab_size=67, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4, num_hidden_layers=4, attn_layer_period=2,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2),
    "nemotron_h": lambda: transformers.NemotronHConfig(
        vocab_size=71, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, chunk_size=16, intermediate_size=24, n_groups=2,
        layers_block_type=["linear_attention", "mlp", "linear_attention", "full_attention"]),  # M-M*
    "bamba": lambda: transformers.BambaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=16),
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
        vocab_size=59, hidden_size=32, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=12, shared_intermediate_size=20,
        num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=16, embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3,
        logits_scaling=2.5),
}

#: mamba_ssm MambaLMHeadModel configs, built from a transformers twin with the same tensors.
MAMBA_SSM = {
    "mamba_ssm_mamba1": (lambda: transformers.MambaConfig(vocab_size=96, hidden_size=32, state_size=8,
                                                          num_hidden_layers=2, expand=2),
                         {"d_model": 32, "n_layer": 2, "vocab_size": 90, "ssm_cfg": {"d_state": 8}}),
    "mamba_ssm_mamba2": (lambda: transformers.Mamba2Config(vocab_size=96, hidden_size=32, num_heads=4, head_dim=16,
                                                           state_size=8, n_groups=2, num_hidden_layers=2,
                                                           chunk_size=8, tie_word_embeddings=True),
                         {"d_model": 32, "n_layer": 2, "vocab_size": 90,
                          "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}}),
}

SEQ = dict(seq_len=21, batch=2)  # 21: not a multiple of any chunk size


def _skip_unless_loadable(model_type):
    if model_type not in FAMILIES:
        pytest.skip(HYBRIDS_MISSING.format(model_type))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            if name in CONFIGS:
                random_torch_model(CONFIGS[name]()).save_pretrained(path)
            else:  # mamba_ssm's layout: config.json with d_model/n_layer/ssm_cfg, pytorch_model.bin
                make_config, ssm_config = MAMBA_SSM[name]
                twin = random_torch_model(make_config())
                state = {k.replace("backbone.embeddings.", "backbone.embedding."): v
                         for k, v in twin.state_dict().items()}
                state["lm_head.weight"] = state["backbone.embedding.weight"]  # mamba_ssm saves the tied head
                torch.save(state, path / "pytorch_model.bin")
                (path / "config.json").write_text(json.dumps(
                    {**ssm_config, "rms_norm": True, "residual_in_fp32": True, "tie_embeddings": True,
                     "pad_vocab_size_multiple": 8}))
            cache[name] = path
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(MAMBA_SSM))
def test_float32_agreement(checkpoints, name):
    if name in CONFIGS:
        _skip_unless_loadable(name)
    report = compare(checkpoints(name), **SEQ)
    assert report["passed"], format_report(report)
    assert report["logits"]["rel_l2"] < 1e-4 and report["first_diverging"] is None
    assert report["logits"]["top1"] == 1.0 and report["logits"]["kl"] < 1e-8
    n_sub = HIDDEN_STATES_LAYOUT[report["model_type"]][0]
    assert len(report["rows"]) == len(report["layers"]) + 2  # embeddings, every sublayer, final norm
    assert report["rows"][-2]["hf_layer"] == len(report["layers"]) // n_sub - 1
    assert all(r["rel_l2"] < 1e-4 for r in report["rows"])
    if name in MAMBA_SSM:
        assert report["layout"] == "mamba_ssm" and "converted in memory" in report["reference"]


def _perturb(src, dst, suffix):
    """A copy of checkpoint ``src`` at ``dst`` with the one tensor whose name ends in ``suffix`` moved by
    10% of its RMS plus 0.05 (transformers may save under a legacy prefix, e.g. ``backbone.``)."""
    shutil.copytree(src, dst)
    (file,) = dst.glob("*.safetensors")
    tensors = load_file(file)
    (name,) = [k for k in tensors if k.endswith(suffix)]
    t = tensors[name]
    noise = np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype)
    tensors[name] = t + (0.1 * np.sqrt(np.mean(np.square(t))) + 0.05) * noise
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name, tensor, sublayer, hf_layer", [
    ("mamba2", "layers.1.mixer.out_proj.weight", 1, 1),
    ("jamba", "layers.2.mamba.x_proj.weight", 4, 2),  # decoder layer 2's Mamba: our sublayer 4
    ("jamba", "layers.1.feed_forward.down_proj.weight", 3, 1),  # decoder layer 1's MLP: our sublayer 3
    ("nemotron_h", "layers.3.mixer.k_proj.weight", 3, 3),
    ("granitemoehybrid", "layers.1.shared_mlp.output_linear.weight", 3, 1),  # decoder layer 1's shared MLP
])
def test_perturbed_tensor_fails_at_its_layer(checkpoints, tmp_path, name, tensor, sublayer, hf_layer):
    _skip_unless_loadable(name)
    src = checkpoints(name)
    bad = _perturb(src, tmp_path / "bad", tensor)
    out = tmp_path / "report.json"
    rc = main(["--model", str(src), "--jax-model", str(bad), "--seq-len", "21", "--batch", "2", "--json", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    first = report["first_diverging"]
    assert (first["sublayer"], first["hf_layer"]) == (sublayer, hf_layer), first
    assert all(r["rel_l2"] < 1e-5 for r in report["rows"][:sublayer + 1])  # embeddings .. sublayer - 1
    assert not report["passed"]


def test_cli_subprocess_exit_code_and_report(checkpoints, tmp_path):
    """``python -m jamba_jax.compare``: a perturbed norm weight of layer 2 fails there; the clean
    checkpoint passes in bfloat16 (with transformers' own bfloat16 error as the yardstick)."""
    src = checkpoints("mamba")
    bad = _perturb(src, tmp_path / "bad", "layers.2.norm.weight")
    run = subprocess.run([sys.executable, "-m", "jamba_jax.compare", "--model", str(src), "--jax-model", str(bad),
                          "--seq-len", "13", "--batch", "1"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL" in run.stdout and "first divergence at sublayer 2 (mamba1), HF layer 2" in run.stdout
    out = tmp_path / "bf16.json"
    assert main(["--model", str(src), "--prompt", "x = 1", "--dtype", "bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tokens"].startswith("prompt 'x = 1' (UTF-8 bytes")
    assert 0 < report["logits"]["rel_l2"] < report["logits"]["tolerance"]
    assert report["logits"]["yardstick_rel_l2"] > 0 and report["logits"]["tolerance"] >= 3e-2


def test_bfloat16_with_moe_and_mup_scalars(checkpoints, tmp_path):
    """Granite in bfloat16: the reference's experts run as a loop (transformers' grouped matmul refuses
    these narrow bfloat16 experts) and our muP scalars hold up at low precision."""
    out = tmp_path / "bf16.json"
    assert main(["--model", str(checkpoints("granitemoehybrid")), "--dtype", "bfloat16", "--seq-len", "21",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 < report["logits"]["rel_l2"] < report["logits"]["tolerance"]
    assert report["logits"]["yardstick_rel_l2"] > 0


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_missing_cuda_exits_2_not_1(checkpoints, capsys):
    """1 means 'above tolerance': an environment without the asked-for device is bad input."""
    assert main(["--model", str(checkpoints("mamba2")), "--torch-device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
