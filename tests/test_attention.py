"""Attention: parity with transformers (Jamba, Bamba partial RoPE), packing, splash vs XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jamba_jax.config import AttentionConfig, RopeConfig
from jamba_jax.layers.attention import Attention
from tests.helpers import rel_l2, run_on_simulated_devices

D_MODEL, N_HEADS, N_KV, HEAD_DIM = 64, 4, 2, 16


def _copy_linear(ours: nnx.Linear, theirs: torch.nn.Linear) -> None:
    """torch weight (out, in) -> our kernel (in, out)."""
    ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
    if theirs.bias is not None:
        ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())


def _from_torch(torch_attn, cfg: AttentionConfig) -> Attention:
    ours = Attention(cfg, D_MODEL, impl="xla", rngs=nnx.Rngs(0))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _copy_linear(getattr(ours, name), getattr(torch_attn, name))
    return ours


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _causal_additive_mask(b: int, l: int) -> torch.Tensor:
    mask = torch.full((l, l), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None].expand(b, 1, l, l)


def test_parameter_shapes_and_logical_axes():
    cfg = AttentionConfig(N_HEADS, N_KV, HEAD_DIM, qkv_bias=True, out_bias=False)
    m = Attention(cfg, D_MODEL, rngs=nnx.Rngs(0))
    assert m.q_proj.kernel.shape == (D_MODEL, N_HEADS * HEAD_DIM)
    assert m.k_proj.kernel.shape == m.v_proj.kernel.shape == (D_MODEL, N_KV * HEAD_DIM)
    assert m.o_proj.kernel.shape == (N_HEADS * HEAD_DIM, D_MODEL)
    assert m.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert m.k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads")
    assert m.v_proj.bias.get_metadata()["out_sharding"] == ("kv_heads",)
    assert m.o_proj.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert m.o_proj.bias is None
    with pytest.raises(ValueError, match="impl"):
        Attention(cfg, D_MODEL, impl="flash", rngs=nnx.Rngs(0))


def test_jamba_parity():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaAttention

    hf_cfg = JambaConfig(hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
                         num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1)
    hf_cfg._attn_implementation = "eager"
    ref = JambaAttention(hf_cfg, layer_idx=1).eval()
    _randomize(ref, 0)
    ours = _from_torch(ref, AttentionConfig(N_HEADS, N_KV, HEAD_DIM))

    b, l = 2, 17
    x = np.random.default_rng(0).standard_normal((b, l, D_MODEL)).astype(np.float32)
    with torch.no_grad():
        expected, _ = ref(torch.from_numpy(x), attention_mask=_causal_additive_mask(b, l))
    assert rel_l2(ours(jnp.asarray(x)), expected.numpy()) < 1e-5


def test_bamba_parity_partial_rope():
    from transformers import BambaConfig
    from transformers.models.bamba.modeling_bamba import BambaAttention, BambaRotaryEmbedding

    hf_cfg = BambaConfig(hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
                         mamba_n_heads=8, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    hf_cfg._attn_implementation = "eager"
    assert hf_cfg.rope_parameters["partial_rotary_factor"] == 0.5
    ref = BambaAttention(hf_cfg, layer_idx=0).eval()
    _randomize(ref, 1)
    rotary = BambaRotaryEmbedding(hf_cfg)
    cfg = AttentionConfig(N_HEADS, N_KV, HEAD_DIM, qkv_bias=True, out_bias=True,
                          rope=RopeConfig(theta=5000.0, fraction=0.5))
    ours = _from_torch(ref, cfg)

    b, l = 2, 15
    x = np.random.default_rng(1).standard_normal((b, l, D_MODEL)).astype(np.float32)
    xt = torch.from_numpy(x)
    default_pos = np.broadcast_to(np.arange(l), (b, l))
    offset_pos = default_pos + np.array([[3], [40]])
    for positions in (None, offset_pos):
        pos = torch.from_numpy(np.ascontiguousarray(default_pos if positions is None else positions))
        with torch.no_grad():
            expected, _ = ref(xt, position_embeddings=rotary(xt, pos), attention_mask=_causal_additive_mask(b, l))
        got = ours(jnp.asarray(x), positions=None if positions is None else jnp.asarray(positions))
        assert rel_l2(got, expected.numpy()) < 1e-5, positions


@pytest.mark.parametrize("rope", [None, RopeConfig(theta=10000.0, fraction=0.5)], ids=["no_rope", "rope"])
def test_packing_equals_separate_segments(rope):
    cfg = AttentionConfig(N_HEADS, N_KV, HEAD_DIM, rope=rope)
    m = Attention(cfg, D_MODEL, impl="xla", rngs=nnx.Rngs(2))
    graphdef, state = nnx.split(m)
    run = jax.jit(lambda x, seg, pos: nnx.merge(graphdef, state)(x, segment_ids=seg, positions=pos))
    # Row 0: three documents; the last reuses id 1 but is a new document (a change of id starts one).
    lengths = [[5, 7, 4], [16]]
    ids = [[1] * 5 + [2] * 7 + [1] * 4, [7] * 16]
    l = 16
    x = jax.random.normal(jax.random.key(3), (2, l, D_MODEL))
    segment_ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.asarray([np.concatenate([np.arange(n) for n in row]) for row in lengths], jnp.int32)
    packed = run(x, segment_ids, positions if rope else None)
    # Each document alone: at the start of its own row, zero-padded after it (causal, so the
    # padding cannot reach it), default positions.
    spans = [(r, start, n) for r, row in enumerate(lengths) for start, n in zip(np.cumsum([0] + row[:-1]), row)]
    alone_x = jnp.stack([jnp.pad(x[r, start:start + n], [(0, l - n), (0, 0)]) for r, start, n in spans])
    alone = run(alone_x, None, None)
    for i, (r, start, n) in enumerate(spans):
        assert rel_l2(packed[r, start:start + n], alone[i, :n]) < 1e-5, (r, start, n)


@pytest.mark.parametrize("scale", [None, 0.3])  # None: 1/sqrt(head_dim); Granite sets its own
def test_splash_interpret_matches_xla(scale):
    cfg = AttentionConfig(N_HEADS, N_KV, HEAD_DIM, qkv_bias=True, rope=RopeConfig(fraction=0.5), scale=scale)
    m = Attention(cfg, D_MODEL, rngs=nnx.Rngs(4))
    graphdef, state = nnx.split(m)
    b, l = 2, 13  # l is not a multiple of the 128 block: padded inside
    x = jax.random.normal(jax.random.key(5), (b, l, D_MODEL))
    segment_ids = jnp.asarray([[0] * 6 + [1] * 7, [4] * 13], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(7)), list(range(13))], jnp.int32)
    cot = jax.random.normal(jax.random.key(6), (b, l, D_MODEL))

    @jax.jit
    def value_and_grad_x(x, impl):
        def f(x):
            return nnx.merge(graphdef, state)(x, segment_ids=segment_ids, positions=positions, impl=impl)
        y, vjp = jax.vjp(f, x)
        return y, vjp(cot)[0]

    value_and_grad_x = jax.jit(value_and_grad_x.__wrapped__, static_argnums=1)
    y_xla, g_xla = value_and_grad_x(x, "xla")
    y_splash, g_splash = value_and_grad_x(x, "splash")
    assert rel_l2(y_splash, y_xla) < 1e-5
    assert rel_l2(g_splash, g_xla) < 1e-5


PER_DEVICE_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from jamba_jax.layers import attention as attn
from jamba_jax.layers.common import activation_sharding
from jamba_jax.train.sharding import logical_to_spec

mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as the trainer's
rule = lambda rules: lambda names, shape: NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh))
rules = dict(batch=("data",), heads=("tensor",), kv_heads=("tensor",))
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (4, 24, 4, 8))
k, v = (jax.random.normal(key, (4, 24, 2, 8)) for key in keys[1:])
seg = jnp.asarray(np.repeat(np.array([[0, 1, 1, 2], [0, 0, 0, 0], [3, 3, 4, 4], [1, 2, 3, 4]]), 6, axis=1))
ones = jnp.ones_like(seg)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
seen = []

def local(q, k, v, segment_ids):  # records the per-device shapes it is called with
    seen.append(q.shape)
    return attn.xla_attention(q, k, v, segment_ids)

def loss(q, k, v, seg, sharded):
    def f(q, k, v):
        out = attn.per_device(local, q, k, v, seg)
        return out if out is not None else attn.xla_attention(q, k, v, seg)
    if not sharded:
        return jnp.sum(jnp.sin(f(q, k, v)))
    with activation_sharding(rule(rules)):
        return jnp.sum(jnp.sin(f(q, k, v)))

for segment_ids in (seg, None):
    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, segment_ids, False)
    seen.clear()
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=4)(q, k, v, segment_ids, True)
    assert seen == [(2, 24, 2, 8)], seen  # each device: half the rows, half the heads
    errs = [rel(got[0], want[0])] + [rel(a, b) for a, b in zip(got[1], want[1])]
    assert max(errs) < 1e-5, errs
# kv heads the tensor axis does not divide: q and k/v placed differently -> None (caller's fallback)
with activation_sharding(rule(dict(batch=("data",), heads=("tensor",), kv_heads=("tensor",)))):
    assert attn.per_device(local, q, k[:, :, :1], v[:, :, :1], None) is None
print("ok")
"""


def test_per_device_attention_under_a_mesh_matches_one_device():
    """`per_device` (how cuDNN attention runs under a trainer's mesh) on 4 simulated CPU devices, rows
    and heads split, packed rows included: values and gradients equal the unsharded call's."""
    assert run_on_simulated_devices(PER_DEVICE_SCRIPT, 4).strip().endswith("ok")
