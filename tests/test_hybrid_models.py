"""Jamba, Nemotron-H, Bamba and Granite 4.0 LMs against transformers' PyTorch models (float32 logits
parity), older checkpoint layouts, save_pretrained round trips and packed sequences."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jamba_jax
from jamba_jax.config import jamba_layers
from jamba_jax.convert import FAMILIES, _infer_model_type
from jamba_jax.convert.io import read_tensors, write_checkpoint
from jamba_jax.params import flat_params
from tests.helpers import rel_l2
from tests.torch_models import random_torch_model, torch_logits

_JAMBA = dict(vocab_size=67, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, rms_norm_eps=1e-5)
_NEMOTRON = dict(vocab_size=71, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, chunk_size=16, intermediate_size=24,
                 layer_norm_epsilon=1e-5)

CONFIGS = {
    # 4 decoder layers: attention at odd layers, MoE at even ones, top-2 of 4 experts
    "jamba_p2": lambda: transformers.JambaConfig(**_JAMBA, num_hidden_layers=4, attn_layer_period=2,
                                                 attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                                                 num_experts=4, num_experts_per_tok=2),
    # 8 decoder layers: attention period 4 offset 2, MoE period 2 offset 1, top-1 of 3, tied head, biases
    "jamba_p4": lambda: transformers.JambaConfig(**_JAMBA, num_hidden_layers=8, attn_layer_period=4,
                                                 attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
                                                 num_experts=3, num_experts_per_tok=1, tie_word_embeddings=True,
                                                 mamba_proj_bias=True, mamba_conv_bias=False),
    # num_experts == 1: every feed-forward is a plain MLP
    "jamba_dense": lambda: transformers.JambaConfig(**_JAMBA, num_hidden_layers=3, attn_layer_period=3,
                                                    attn_layer_offset=0, num_experts=1),
    # M * - E, two SSM groups, sigmoid MoE with 4 expert groups (2 kept), shared expert, scaled weights
    "nemotron_h_moe": lambda: transformers.NemotronHConfig(
        **_NEMOTRON, layers_block_type=[{"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}[s]
                                        for s in "M-M*EM-E"],
        n_groups=2, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=20, routed_scaling_factor=2.5, norm_topk_prob=True,
        time_step_min=0.3, time_step_max=1.0),
    # legacy hybrid_override_pattern, MLP biases, one SSM group, gelu MLP
    "nemotron_h_dense": lambda: transformers.NemotronHConfig(
        **_NEMOTRON, hybrid_override_pattern="M*M-", n_groups=1, mlp_bias=True, mlp_hidden_act="gelu",
        use_bias=True),
    # Mamba-2 + attention with partial RoPE (the 0.5 default), attention biases
    "bamba": lambda: transformers.BambaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=4, attn_layer_indices=[1], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=16, attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        time_step_limit=(0.0, 2.0)),
    # a quarter of each head rotated, tied head, MLP biases, no conv bias
    "bamba_quarter_rope": lambda: transformers.BambaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=3, attn_layer_indices=[0, 2], num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=40, mamba_n_heads=8, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=8, mlp_bias=True, mamba_conv_bias=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    # Granite 4.0-H: MoE renormalised over its top 2 of 5 plus a shared MLP in every layer, muP
    # scalars far from 1, RoPE, attention biases, two SSM groups
    "granite_moe": lambda: transformers.GraniteMoeHybridConfig(
        vocab_size=59, hidden_size=32, num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=12, shared_intermediate_size=20,
        num_local_experts=5, num_experts_per_tok=2, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=16, embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3,
        logits_scaling=2.5, position_embedding_type="rope", attention_bias=True, time_step_limit=(0.0, 2.0),
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # dense Granite (num_local_experts=0: the shared MLP alone), no positional encoding, tied head,
    # heads wider than hidden_size / num_attention_heads
    "granite_dense": lambda: transformers.GraniteMoeHybridConfig(
        vocab_size=59, hidden_size=32, num_hidden_layers=3, layer_types=["attention", "mamba", "mamba"],
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_local_experts=0, shared_intermediate_size=24,
        mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=8, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.0625, logits_scaling=6.0, position_embedding_type="nope", tie_word_embeddings=True,
        mamba_conv_bias=False),
}


def _perturb_zero_biases(model, seed=1):
    """Linear biases start at zero; move them so a test cannot pass by dropping them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not p.any():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (torch model, checkpoint path, our model), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch_model = _perturb_zero_biases(random_torch_model(CONFIGS[name]()))
            path = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(path)
            cache[name] = (torch_model, path, jamba_jax.from_pretrained(path))
        return cache[name]

    return get


def _ids(vocab, b=2, l=37, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, l))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_float32(checkpoints, name):
    torch_model, _, model = checkpoints(name)
    assert model.config.model_type == torch_model.config.model_type
    ids = _ids(model.config.vocab_size)  # 37: not a multiple of any chunk size
    assert rel_l2(model(jnp.asarray(ids)), torch_logits(torch_model, ids)) < 1e-4


def test_config_mapping(checkpoints):
    jamba = checkpoints("jamba_p4")[2].config
    assert jamba.layers == jamba_layers(8, attn_period=4, attn_offset=2, expert_period=2, expert_offset=1)
    assert jamba.mamba1.bcdt_norm == "weighted" and jamba.moe.top_k == 1 and not jamba.moe.normalize_top_k
    assert set(checkpoints("jamba_dense")[2].config.layers[1::2]) == {"mlp"}
    nemo = checkpoints("nemotron_h_moe")[2].config
    assert nemo.layers == jamba_jax.config.layers_from_pattern("M-M*EM-E")
    assert nemo.mamba2.dt_limit == (0.0, float("inf"))  # time_step_min=0.3 only initialises dt_bias
    assert (nemo.moe.n_groups, nemo.moe.top_k_groups, nemo.moe.shared_d_ff) == (4, 2, 20)
    bamba = checkpoints("bamba_quarter_rope")[2].config
    assert bamba.attention.rope.fraction == 0.25 and bamba.tie_embeddings
    granite = checkpoints("granite_moe")[2].config
    assert granite.layers[0::2] == ("mamba2", "attention", "mamba2", "mamba2") and set(granite.layers[1::2]) == {"moe"}
    assert (granite.moe.normalize_top_k, granite.moe.shared_d_ff, granite.attention.scale) == (True, 20, 0.3)
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.logits_divisor) == (3.0, 0.4, 2.5)
    dense = checkpoints("granite_dense")[2].config
    assert set(dense.layers[1::2]) == {"mlp"} and dense.mlp.d_ff == 24 and dense.attention.rope is None
    assert dense.attention.head_dim == 16


def _round_trip(model, torch_model, path):
    jamba_jax.save_pretrained(model, path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert type(reloaded) is type(torch_model)
    ids = _ids(model.config.vocab_size, l=19)
    assert rel_l2(torch_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids)))) < 1e-5
    return reloaded


@pytest.mark.parametrize("name", ["jamba_p4", "nemotron_h_moe", "bamba", "granite_moe", "granite_dense"])
def test_save_pretrained_round_trips_through_transformers(checkpoints, name, tmp_path):
    torch_model, _, model = checkpoints(name)
    reloaded = _round_trip(model, torch_model, tmp_path)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(reloaded.config, key) == getattr(torch_model.config, key)


def test_save_pretrained_infers_model_type(checkpoints, tmp_path):
    """A config not read from a checkpoint: the writer finds the family that can hold it."""
    import dataclasses

    types = ("jamba", "nemotron_h", "bamba", "granitemoehybrid")
    for name, expected in (("jamba_p2", "jamba"), ("nemotron_h_moe", "nemotron_h"), ("bamba", "bamba"),
                           ("granite_moe", "granitemoehybrid")):
        cfg = dataclasses.replace(checkpoints(name)[2].config, model_type="jamba_jax", extra={})
        assert _infer_model_type(cfg) == expected
        others = [t for t in types if t != expected]
        for other in others:
            with pytest.raises(ValueError):
                FAMILIES[other].config_to_hf(cfg)
    torch_model, _, model = checkpoints("jamba_p2")
    model.config = dataclasses.replace(model.config, model_type="jamba_jax", extra={})
    try:
        _round_trip(model, torch_model, tmp_path)
    finally:
        model.config = checkpoints("jamba_p2")[2].config


def test_families_without_mup_scalars_refuse_them(checkpoints):
    """Only Granite can write muP scalars; any other family would drop them silently."""
    import dataclasses

    nemotron = checkpoints("nemotron_h_moe")[2].config
    with pytest.raises(ValueError, match="nemotron_h cannot express {'residual_multiplier': 0.5}"):
        FAMILIES["nemotron_h"].config_to_hf(dataclasses.replace(nemotron, residual_multiplier=0.5))
    bamba = checkpoints("bamba")[2].config
    plain = dataclasses.replace(bamba.attention, scale=bamba.attention.head_dim ** -0.5)
    FAMILIES["bamba"].config_to_hf(dataclasses.replace(bamba, attention=plain))  # the usual scale, spelled out
    with pytest.raises(ValueError, match="attention.scale"):
        FAMILIES["bamba"].config_to_hf(dataclasses.replace(bamba, attention=dataclasses.replace(plain, scale=0.5)))


def _rewrite(src, dst, rename):
    """Copy a checkpoint, passing its tensors through ``rename(dict) -> dict``."""
    config = json.loads((src / "config.json").read_text())
    write_checkpoint(dst, config, rename(read_tensors(src)))
    return dst


def _jamba_per_expert(tensors):
    """transformers 5.x fused experts -> the per-expert layout of older checkpoints (Jamba-v0.1)."""
    out = {}
    for name, a in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            f = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = a[e, :f]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = a[e, f:]
        elif name.endswith("experts.down_proj"):
            for e in range(a.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = a[e]
        else:
            out[name] = a
    return out


def _nemotron_original(tensors):
    """NVIDIA's layout: ``backbone.`` prefix and per-expert ``up_proj`` / ``down_proj`` weights."""
    out = {}
    for name, a in tensors.items():
        name = "backbone." + name[len("model."):] if name.startswith("model.") else name
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            stem, proj = name.rsplit(".", 1)
            for e in range(a.shape[0]):
                out[f"{stem}.{e}.{proj}.weight"] = a[e]
        else:
            out[name] = a
    return out


@pytest.mark.parametrize("name,to_old", [("jamba_p4", _jamba_per_expert), ("nemotron_h_moe", _nemotron_original)])
def test_fused_and_per_expert_layouts_load(checkpoints, name, to_old, tmp_path):
    """The fused 5.x layout (the torch module's own state dict) and the per-expert layout built from it
    both load, in transformers and here, to the same model; we write transformers' on-disk layout."""
    torch_model, path, model = checkpoints(name)
    # transformers' save_pretrained reverts its load-time conversion: on disk it is the older layout
    assert any(".experts.0." in n for n in read_tensors(path))
    config = json.loads((path / "config.json").read_text())
    fused = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    assert any(k.endswith("experts.down_proj") for k in fused)
    write_checkpoint(tmp_path / "fused", config, fused)
    write_checkpoint(tmp_path / "old", config, to_old(fused))
    ids = _ids(model.config.vocab_size, l=23)
    expected = flat_params(model)
    for layout in ("fused", "old"):
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / layout).float().eval()
        assert rel_l2(torch_logits(reloaded, ids), torch_logits(torch_model, ids)) < 1e-6
        got = flat_params(jamba_jax.from_pretrained(tmp_path / layout))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    # we write what transformers' own save_pretrained writes
    jamba_jax.save_pretrained(model, tmp_path / "ours")
    assert set(read_tensors(tmp_path / "ours")) == set(read_tensors(path))


def test_granite_in_memory_layout_loads(checkpoints, tmp_path):
    """Granite on disk (IBM's ``input_linear`` / ``output_linear`` / ``router.layer``, what transformers
    writes) and as transformers 5.x modules name it (``experts.gate_up_proj``, ``router.weight``) load to
    the same model; we write the on-disk names."""
    torch_model, path, model = checkpoints("granite_moe")
    on_disk = set(read_tensors(path))
    assert any(n.endswith("block_sparse_moe.input_linear.weight") for n in on_disk)
    config = json.loads((path / "config.json").read_text())
    in_memory = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    assert any(k.endswith("block_sparse_moe.experts.gate_up_proj") for k in in_memory)
    write_checkpoint(tmp_path / "in_memory", config, in_memory)
    got, expected = flat_params(jamba_jax.from_pretrained(tmp_path / "in_memory")), flat_params(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    jamba_jax.save_pretrained(model, tmp_path / "ours")
    assert set(read_tensors(tmp_path / "ours")) == on_disk


def test_granite_ibm_config_json_loads_and_round_trips(checkpoints, tmp_path):
    """IBM's own config.json style (``mamba`` / ``attention`` layer names, a top-level ``rope_theta``,
    ``rope_scaling: null``, integer multipliers), not what transformers 5.x writes."""
    torch_model, path, _ = checkpoints("granite_moe")
    config = json.loads((path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(layer_types=["mamba", "attention", "mamba", "mamba"], rope_theta=theta, rope_scaling=None,
                  embedding_multiplier=3, logits_scaling=2.5)
    ibm = tmp_path / "ibm"
    write_checkpoint(ibm, config, read_tensors(path))
    model = jamba_jax.from_pretrained(ibm)
    assert model.config.attention.rope.theta == theta and model.config.embedding_multiplier == 3.0
    ids = _ids(model.config.vocab_size)
    assert rel_l2(model(jnp.asarray(ids)), torch_logits(torch_model, ids)) < 1e-4
    reloaded = _round_trip(model, torch_model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["layer_types"] == config["layer_types"] and written["rope_theta"] == theta
    assert reloaded.config.rope_parameters["rope_theta"] == theta


def test_layout_errors_name_the_closest_layout(checkpoints, tmp_path):
    _, path, _ = checkpoints("jamba_p2")

    def drop_one(tensors):
        tensors = _jamba_per_expert(tensors)
        del tensors["model.layers.0.feed_forward.experts.3.up_proj.weight"]
        return tensors

    with pytest.raises(ValueError, match=r"missing: model\.layers\.0\.feed_forward\.experts\.3\.up_proj\.weight "
                                         r"\(24, 16\)"):
        jamba_jax.from_pretrained(_rewrite(path, tmp_path / "bad", drop_one))


@pytest.mark.parametrize("name", ["jamba_p2", "nemotron_h_moe", "granite_moe"])
def test_packed_segments_equal_separate_runs(checkpoints, name):
    model = checkpoints(name)[2]
    lengths = [5, 11, 1, 20]  # boundaries inside chunks, one single-token document
    ids = _ids(model.config.vocab_size, b=1, l=sum(lengths))
    seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)[None]
    packed = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
    # each document alone, as one row of a batch padded at the end (causal: padding cannot leak back)
    starts = np.cumsum([0] + lengths[:-1])
    rows = np.zeros((len(lengths), max(lengths)), ids.dtype)
    for r, (s, n) in enumerate(zip(starts, lengths)):
        rows[r, :n] = ids[0, s:s + n]
    alone = np.asarray(model(jnp.asarray(rows)))
    for r, (s, n) in enumerate(zip(starts, lengths)):
        assert rel_l2(packed[0, s:s + n], alone[r, :n]) < 1e-4


@pytest.mark.parametrize("model_type,fields,match", [
    ("nemotron_h", {"moe_latent_size": 8}, "moe_latent_size"),
    ("nemotron_h", {"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
    ("nemotron_h", {"mlp_bias": True, "hybrid_override_pattern": "ME"}, "mlp_bias"),
    ("nemotron_h", {"mlp_hidden_act": "silu", "hybrid_override_pattern": "M-"}, "mlp_hidden_act"),
    ("jamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("bamba", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ("granitemoehybrid", {"position_embedding_type": "rope", "rope_parameters": {"rope_type": "yarn"}},
     "rope_parameters"),
    ("granitemoehybrid", {"num_hidden_layers": 2, "layer_types": ["mamba", "cross_attention"]}, "layer_types"),
    ("granitemoehybrid", {"num_hidden_layers": 3, "layer_types": ["mamba", "attention"]}, "layer_types"),
    ("granitemoehybrid", {"shared_intermediate_size": 0}, "shared_intermediate_size"),
    ("granitemoehybrid", {"hidden_act": "gelu"}, "hidden_act"),
    ("mamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("falcon_mamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("mamba2", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_features_raise(model_type, fields, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **fields}))
    with pytest.raises(ValueError, match=match):
        jamba_jax.convert.config_from_pretrained(tmp_path)


def test_nemotron_legacy_dt_limit_key(tmp_path):
    """Older Nemotron-H configs name time_step_limit mamba_dt_limit (transformers maps it)."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "nemotron_h", "hybrid_override_pattern": "M", "mamba_dt_limit": [0.0, 0.01]}))
    assert jamba_jax.convert.config_from_pretrained(tmp_path)[0].mamba2.dt_limit == (0.0, 0.01)
