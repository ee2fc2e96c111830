"""Cached generation: transformers parity, decode == full forward, ragged batches, eos, sampling, CLI,
bfloat16 SSM state, in-place cache updates in the compiled decode loop.

XLA compiles slowly on a small CPU, so the models are tiny, periods short, and each test compiles
as few distinct functions as it can.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jamba_jax
from jamba_jax.cache import KVCache, SSMCache, cache_bytes, cache_copies_in_loop, cache_shapes, init_cache
from jamba_jax.config import AttentionConfig, Mamba1Config, Mamba2Config, ModelConfig, MoEConfig, RopeConfig
from jamba_jax.generate import TokenStream, decode_step, main, prefill, sample
from jamba_jax.model import LanguageModel
from jamba_jax.params import model_from_flat, param_shapes
from tests.helpers import rel_l2
from tests.torch_models import random_torch_model

# ------------------------------------------------------------------ 1. greedy == transformers

HF_CONFIGS = {
    "mamba": lambda: transformers.MambaConfig(vocab_size=97, hidden_size=24, state_size=8, num_hidden_layers=2,
                                              expand=2, conv_kernel=4, time_step_rank=4, use_bias=True),
    "mamba2": lambda: transformers.Mamba2Config(vocab_size=101, hidden_size=24, num_heads=6, head_dim=8,
                                                state_size=16, n_groups=3, expand=2, num_hidden_layers=2,
                                                chunk_size=4, tie_word_embeddings=False),
    # decoder layers (Mamba-1 + MoE, attention + MLP): sublayers mamba1, moe, attention, mlp
    "jamba": lambda: transformers.JambaConfig(
        vocab_size=67, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, num_hidden_layers=2, attn_layer_period=2,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2),
    # M * E, twice: a period of three sublayers scanned over two repetitions
    "nemotron_h": lambda: transformers.NemotronHConfig(
        vocab_size=71, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, chunk_size=4, intermediate_size=24, n_groups=2,
        layers_block_type=[{"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}[s] for s in "M*EM*E"],
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, moe_shared_expert_intermediate_size=20),
    # Mamba-2 + MLP, attention with partial RoPE + MLP: decode positions against transformers' RoPE
    "bamba": lambda: transformers.BambaConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, attn_layer_indices=[1], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=4, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # Granite 4.0-H: muP scalars on the embeddings, every residual add, the attention scores and the
    # logits, through prefill and every decode step; MoE plus shared MLP; RoPE
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
        vocab_size=59, hidden_size=32, num_hidden_layers=2, layer_types=["mamba", "attention"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=12, shared_intermediate_size=20, num_local_experts=4,
        num_experts_per_tok=2, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=4,
        embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=2.5,
        position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def _ids(vocab, b, l, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, l))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_greedy_matches_transformers(name, tmp_path):
    torch_model = random_torch_model(HF_CONFIGS[name]())
    torch_model.save_pretrained(tmp_path)
    model = jamba_jax.from_pretrained(tmp_path)
    ids = _ids(model.config.vocab_size, b=2, l=7)  # 7: prefill ends inside an SSD chunk
    n = 10
    torch_model.generation_config.eos_token_id = None
    torch_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = torch_model.generate(torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                        max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    got = np.asarray(jamba_jax.generate(model, ids, max_new_tokens=n))
    assert got.dtype == np.int32 and got.shape == (2, 7 + n)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------ 2. decode == full forward logits

M1 = Mamba1Config(d_inner=32, d_state=4, dt_rank=3)
M2 = Mamba2Config(n_heads=4, head_dim=8, d_state=8, n_groups=2, chunk_size=4)
OWN_CONFIGS = {
    "mamba1": ModelConfig(vocab_size=53, d_model=16, layers=("mamba1",) * 2, mamba1=M1),
    "mamba2": ModelConfig(vocab_size=53, d_model=16, layers=("mamba2",) * 2, mamba2=M2, tie_embeddings=True),
    # Mamba-2, GQA attention with partial RoPE, MoE: a period of three scanned twice
    "hybrid": ModelConfig(vocab_size=53, d_model=16, layers=("mamba2", "attention", "moe") * 2, mamba2=M2,
                          attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=8, rope=RopeConfig(fraction=0.5)),
                          moe=MoEConfig(n_experts=4, top_k=2, d_ff=12)),
}
_models = {}


def random_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    """Random weights drawn on the host and loaded with ``model_from_flat`` (an eager random init
    compiles one small program per parameter, far slower on a small CPU). SSM parameters and norm
    weights sit near their usual values, off their structured init."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, (shape, _) in param_shapes(cfg).items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("A_log"):
            flat[name] = np.log(rng.uniform(1.0, 8.0, shape)).astype(np.float32)
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            flat[name] = np.log(np.expm1(rng.uniform(0.01, 0.2, shape))).astype(np.float32)
        elif name.endswith(("norm.weight", "norm_weight", "_norm", ".D")):
            flat[name] = 1.0 + 0.2 * noise
        else:
            flat[name] = 0.2 * noise
    return model_from_flat(cfg, flat)


def own_model(name):
    if name not in _models:
        _models[name] = random_model(OWN_CONFIGS[name])
    return _models[name]


@nnx.jit(static_argnames=("max_len", "state_dtype", "zero_state"))
def _teacher_forced(model, ids, lengths, feed, *, max_len, state_dtype="float32", zero_state=False):
    """Prefill the ragged prompts, then decode the tokens ``feed (b, s)``: logits ``(b, s + 1, vocab)``.
    ``zero_state``: wipe every SSM state before each decode step (a control: what the state is worth)."""
    logits, cache = prefill(model, ids, lengths, max_len=max_len, state_dtype=state_dtype)

    def step(cache, tokens):
        if zero_state:
            cache = dataclasses.replace(cache, layers=tuple(
                SSMCache(c.conv, jnp.zeros_like(c.ssm)) if isinstance(c, SSMCache) else c for c in cache.layers))
        out, cache = decode_step(model, tokens, cache)
        return cache, out

    cache, rest = jax.lax.scan(step, cache, feed.T)
    return jnp.concatenate([logits[:, None], jnp.moveaxis(rest, 0, 1)], axis=1), cache


@pytest.mark.parametrize("name", sorted(OWN_CONFIGS))
def test_decode_matches_full_forward(name):
    model = own_model(name)
    L = 17
    lengths = np.array([3, 9, 6])  # ragged prompts, right-padded; 9 crosses two SSD chunks
    ids = _ids(model.config.vocab_size, b=3, l=L, seed=2)
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))  # (b, L, vocab)
    s = L - lengths.max()
    feed = np.stack([ids[i, lengths[i]:lengths[i] + s] for i in range(3)])
    padded = np.where(np.arange(L)[None] < lengths[:, None], ids, 0)[:, :lengths.max()]
    logits, cache = _teacher_forced(model, jnp.asarray(padded), jnp.asarray(lengths), jnp.asarray(feed), max_len=L)
    expected = np.stack([full[i, lengths[i] - 1:lengths[i] + s] for i in range(3)])
    assert np.max(np.abs(np.asarray(logits) - expected)) < 1e-4
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + s)
    # the cache layout: stacked over repetitions like the parameters, SSM state float32
    shapes = cache_shapes(model.config, 3, L)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
    for kind, layer in zip(model.config.layers, cache.layers):
        assert isinstance(layer, {"mamba1": SSMCache, "mamba2": SSMCache, "attention": KVCache}.get(kind, type(None)))
        if isinstance(layer, SSMCache):
            assert layer.ssm.dtype == jnp.float32 and layer.ssm.shape[0] == model.repeats


def test_bfloat16_decode_tracks_full_forward():
    """bf16 weights and activations (float32 SSM state): decode stays near the bf16 full forward."""
    from jamba_jax.params import flat_params

    m32 = own_model("mamba2")
    model = model_from_flat(m32.config, flat_params(m32), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = _ids(model.config.vocab_size, b=2, l=12, seed=7)
    lengths = np.array([5, 8])
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float32)
    feed = np.stack([ids[i, lengths[i]:lengths[i] + 4] for i in range(2)])
    logits, cache = _teacher_forced(model, jnp.asarray(ids[:, :8]), jnp.asarray(lengths), jnp.asarray(feed), max_len=12)
    expected = np.stack([full[i, lengths[i] - 1:lengths[i] + 4] for i in range(2)])
    assert rel_l2(np.asarray(logits), expected) < 1e-2
    assert all(layer.ssm.dtype == jnp.float32 and layer.conv.dtype == jnp.bfloat16 for layer in cache.layers)


# ------------------------------------------------------------------------------ 3. ragged batches

def test_ragged_rows_equal_rows_alone():
    model = own_model("hybrid")
    n = 6
    lengths = np.array([4, 9])
    ids = _ids(model.config.vocab_size, b=2, l=9, seed=3)
    ids[0, 4:] = 52  # padding (any value)
    out = np.asarray(jamba_jax.generate(model, ids, max_new_tokens=n, prompt_lengths=lengths, pad_token_id=1))
    assert out.shape == (2, 9 + n)
    for i, length in enumerate(lengths):
        alone = np.asarray(jamba_jax.generate(model, ids[i:i + 1, :length], max_new_tokens=n))[0]
        np.testing.assert_array_equal(out[i, :length + n], alone)
        assert (out[i, length + n:] == 1).all()  # pad after the row's continuation


# ------------------------------------------------------------------ 4. eos, sampling, streaming

@pytest.fixture(scope="module")
def small():
    return own_model("mamba2")


# the tests below share shapes and options where they can, so compiled calls are reused
def _small_ids(seed):
    return _ids(OWN_CONFIGS["mamba2"].vocab_size, b=2, l=5, seed=seed)


N_NEW = 10
SAMPLED = dict(max_new_tokens=N_NEW, temperature=1.0)


def test_eos_stops_rows_and_pads_with_eos(small):
    ids = _small_ids(4)
    greedy = np.asarray(jamba_jax.generate(small, ids, max_new_tokens=N_NEW))[:, 5:]
    eos = int(greedy[0, 3])  # row 0 emits it at its fourth new token
    out = np.asarray(jamba_jax.generate(small, ids, max_new_tokens=N_NEW, eos_token_id=eos))[:, 5:]
    for row, ref in zip(out, greedy):
        hits = np.flatnonzero(ref == eos)
        stop = hits[0] + 1 if hits.size else N_NEW
        np.testing.assert_array_equal(row[:stop], ref[:stop])
        assert (row[stop:] == eos).all()
    assert (out[0, 3:] == eos).all()


def test_sampling_is_deterministic_given_rng_and_top_k_1_is_greedy(small):
    ids = _small_ids(5)
    a = np.asarray(jamba_jax.generate(small, ids, rng=jax.random.key(1), **SAMPLED))
    np.testing.assert_array_equal(a, np.asarray(jamba_jax.generate(small, ids, rng=jax.random.key(1), **SAMPLED)))
    assert (a != np.asarray(jamba_jax.generate(small, ids, rng=jax.random.key(2), **SAMPLED))).any()
    greedy = np.asarray(jamba_jax.generate(small, ids, max_new_tokens=N_NEW))
    top1 = jamba_jax.generate(small, ids, top_k=1, rng=jax.random.key(3), **SAMPLED)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    assert (a != greedy).any()


def test_sample_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 200)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    got = np.asarray(jax.vmap(lambda k: sample(logits, k, temperature=1.0, top_k=3))(keys))  # (200, 4)
    for row in range(4):
        assert set(got[:, row]) <= set(top3[row]) and len(set(got[:, row])) > 1
    probs = np.asarray(jax.nn.softmax(logits))
    got = np.asarray(jax.vmap(lambda k: sample(logits, k, temperature=1.0, top_p=0.6))(keys))
    sizes = []
    for row in range(4):
        order = np.argsort(-probs[row])
        keep = order[:np.searchsorted(np.cumsum(probs[row][order]), 0.6) + 1]  # smallest set with mass >= 0.6
        assert set(got[:, row]) <= set(keep)
        sizes.append(len(set(got[:, row])))
    assert max(sizes) > 1
    np.testing.assert_array_equal(sample(logits, keys[0]), np.argmax(logits, -1))


def test_token_stream_equals_generate(small):
    ids = _small_ids(6)
    stream = TokenStream(small, ids, chunk=4, rng=jax.random.key(4), **SAMPLED)
    pieces = list(stream)
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 1]
    full = np.asarray(jamba_jax.generate(small, ids, rng=jax.random.key(4), **SAMPLED))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), full[:, 5:])
    np.testing.assert_array_equal(np.asarray(stream.output_ids()), full)


def test_cli_streams_text(small, tmp_path, capsys):
    cfg = ModelConfig(vocab_size=260, d_model=16, layers=("mamba2",), mamba2=M2, model_type="mamba2")
    model = random_model(cfg, seed=1)
    jamba_jax.save_pretrained(model, tmp_path)
    assert main(["--model", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "7", "--chunk", "3",
                 "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    new = np.asarray(jamba_jax.generate(model, np.array([list(b"hello")]), max_new_tokens=7))[0, 5:]
    text = bytes(int(t) for t in new if t < 256).decode("utf-8", errors="replace").rstrip("\ufffd")
    assert captured.out == "hello" + text + "\n"
    assert "prefill: 5 tokens" in captured.err and "decode: 6 tokens" in captured.err


def test_cli_uses_tokenizer_json(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(53)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    model = own_model("mamba2")
    jamba_jax.save_pretrained(model, tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["--model", str(tmp_path), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    new = np.asarray(jamba_jax.generate(model, np.array([[1, 2, 3]]), max_new_tokens=4))[0, 3:]
    assert capsys.readouterr().out == "w1 w2 w3" + tok.decode(new.tolist()) + "\n"


# ------------------------------------------------------------------------ 5. bfloat16 SSM state

BF16_U = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits, round to nearest


@pytest.mark.parametrize("name", ["mamba1", "mamba2", "hybrid"])
def test_bfloat16_state_tracks_float32_state(name):
    """Decoding from a bfloat16 SSM state stays within rounding distance of the float32 state.

    The bound: storing the state in bfloat16 perturbs it by a relative <= u = 2^-8 each step (the
    update itself is float32), so the logits move by about (relative state error) x (what the state
    contributes to the logits). The latter, S, is measured here as the logits' relative change when
    the state is wiped before every step. Observed: err ~ u/2 x S for all three models (rounding
    errors average out, decay forgets old ones); the bound 2 u S leaves 4x for accumulation over the
    12 steps. A decode that computed the update in bfloat16, rounded more than once per step, or
    stored a stale/wrong state moves the logits by a sizeable fraction of S and fails.
    """
    model = own_model(name)
    L, lengths = 24, np.array([5, 9, 7])
    ids = _ids(model.config.vocab_size, b=3, l=L, seed=11)
    feed = jnp.asarray(np.stack([ids[i, lengths[i]:lengths[i] + 12] for i in range(3)]))
    prompt = jnp.asarray(np.where(np.arange(L)[None] < lengths[:, None], ids, 0)[:, :lengths.max()])
    args = (model, prompt, jnp.asarray(lengths), feed)
    ref, _ = _teacher_forced(*args, max_len=L)
    got, cache = _teacher_forced(*args, max_len=L, state_dtype="bfloat16")
    wiped, _ = _teacher_forced(*args, max_len=L, zero_state=True)
    ref, got = np.asarray(ref), np.asarray(got)
    worth = rel_l2(np.asarray(wiped)[:, 1:], ref[:, 1:])
    assert worth > 1e-3, "the SSM state hardly reaches the logits: the comparison would prove nothing"
    err = rel_l2(got, ref)
    assert err < 2 * BF16_U * worth, (err, worth)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))  # same greedy choices along the way
    for kind, layer in zip(model.config.layers, cache.layers):  # the dtype survives prefill and decode
        if isinstance(layer, SSMCache):
            assert layer.ssm.dtype == jnp.bfloat16 and layer.conv.dtype == jnp.float32, kind
        elif isinstance(layer, KVCache):
            assert layer.k.dtype == layer.v.dtype == jnp.float32


def test_bfloat16_state_generate_and_stream(small):
    ids = _small_ids(8)
    ref = np.asarray(jamba_jax.generate(small, ids, max_new_tokens=N_NEW))
    got = np.asarray(jamba_jax.generate(small, ids, max_new_tokens=N_NEW, state_dtype=jnp.bfloat16))
    np.testing.assert_array_equal(got, ref)  # greedy tokens: the logits differ by ~1e-5 relative
    stream = TokenStream(small, ids, max_new_tokens=N_NEW, chunk=4, state_dtype="bfloat16")
    np.testing.assert_array_equal(np.concatenate(list(stream), axis=1), got[:, 5:])
    ssm = [layer.ssm for layer in stream.state.cache.layers if isinstance(layer, SSMCache)]
    assert ssm and all(a.dtype == jnp.bfloat16 for a in ssm)


def test_cache_state_dtype_shapes_and_bytes():
    cfg = OWN_CONFIGS["hybrid"]
    s32, s16 = cache_shapes(cfg, 3, 10), cache_shapes(cfg, 3, 10, state_dtype=jnp.bfloat16)
    assert jax.tree.map(lambda a: a.shape, s32) == jax.tree.map(lambda a: a.shape, s16)
    ssm, kv = s16.layers[0], s16.layers[1]
    assert (ssm.ssm.dtype, ssm.conv.dtype, kv.k.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    zeros = init_cache(cfg, 3, 10, state_dtype="bfloat16")
    assert jax.tree.map(lambda a: (a.shape, a.dtype), zeros) == jax.tree.map(lambda a: (a.shape, a.dtype), s16)
    b32, b16 = cache_bytes(cfg, 3, 10), cache_bytes(cfg, 3, 10, state_dtype="bfloat16")
    assert b16["ssm"] * 2 == b32["ssm"] and b16["conv"] == b32["conv"] and b16["kv"] == b32["kv"]
    # the motivating figure: Mamba-2 2.7B at batch 64 holds 64 x 64 x (80 x 64 x 128) state values
    from jamba_jax.presets import load_preset

    big = load_preset("mamba2-2.7b")
    n = 64 * 64 * 80 * 64 * 128
    assert cache_bytes(big, 64, 1)["ssm"] == 4 * n and cache_bytes(big, 64, 1, state_dtype="bfloat16")["ssm"] == 2 * n


@pytest.mark.parametrize("bad", ["float16", "float64", jnp.int8, "bf16", None])
def test_bad_state_dtype_raises(small, bad):
    ids = _small_ids(4)
    for call in (lambda: jamba_jax.generate(small, ids, max_new_tokens=3, state_dtype=bad),
                 lambda: TokenStream(small, ids, max_new_tokens=3, state_dtype=bad),
                 lambda: prefill(small, jnp.asarray(ids), state_dtype=bad),
                 lambda: cache_shapes(small.config, 2, 8, state_dtype=bad)):
        with pytest.raises(ValueError, match="state_dtype must be one of"):
            call()
    if bad == "float16":
        with pytest.raises(SystemExit):  # argparse: invalid choice
            main(["--model", ".", "--prompt", "x", "--state-dtype", "float16"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(eos_token_id=[1, 2]), "eos_token_id must be a single integer"),
    (dict(prompt_lengths=[2.7, 5]), "prompt_lengths"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_k=1.5), "top_k"), (dict(top_p=float("nan")), "top_p")])
def test_bad_generate_arguments_raise(small, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        jamba_jax.generate(small, _small_ids(4), **kwargs)


def test_empty_batch_raises_and_numpy_seed_is_a_seed(small):
    with pytest.raises(ValueError, match="batch, length >= 1"):
        jamba_jax.generate(small, np.zeros((0, 5), np.int32), max_new_tokens=3)
    a = jamba_jax.generate(small, _small_ids(4), rng=np.int64(3), **SAMPLED)
    np.testing.assert_array_equal(a, jamba_jax.generate(small, _small_ids(4), rng=3, **SAMPLED))
    with pytest.raises(ValueError, match="temperature"):
        sample(jnp.zeros((1, 4)), jax.random.key(0), temperature=float("nan"))


def test_prefill_checks_prompts_and_decode_step_a_full_cache():
    model = own_model("hybrid")       # has attention: a KV capacity
    vocab = model.config.vocab_size
    ids = jnp.asarray(_ids(vocab, b=2, l=5, seed=2))
    for lengths in ([0, 5], [6, 5], [-1, 5]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            prefill(model, ids, jnp.asarray(lengths))
    with pytest.raises(ValueError, match="token ids"):
        prefill(model, ids.at[0, 1].set(vocab + 7))
    with pytest.raises(ValueError, match="max_len"):
        prefill(model, ids, max_len=4)
    _, cache = prefill(model, ids)                   # capacity = the prompt: no room left
    with pytest.raises(ValueError, match="KV cache is full"):
        decode_step(model, ids[:, 0], cache)
    _, cache = prefill(model, ids, max_len=6)
    decode_step(model, ids[:, 0], cache)


# --------------------------------------------------------- 6. the compiled decode loop's cache traffic

@pytest.mark.parametrize("name", sorted(OWN_CONFIGS))
def test_decode_loop_updates_cache_in_place(name):
    """The compiled token loop (prefill's output donated) never copies a layer's cache inside the loop
    nor writes a whole stacked cache array: each layer's state is a loop buffer of its own, updated in
    place. (Two earlier designs failed this: y read out of the old entry of a stacked state by a
    separate fusion, and a stacked state updated at constant indices, each made XLA copy the whole
    stacked state at every layer and token.) float32 model and state: the CPU backend upcasts a
    bfloat16 update to float32, whatever the code does (a CPU-only limitation)."""
    model = own_model(name)
    ids = _ids(model.config.vocab_size, b=3, l=7, seed=5)
    stream = TokenStream(model, ids, max_new_tokens=5, chunk=4)
    stream.compile()
    shapes = cache_shapes(model.config, 3, 7 + 5 - 1)
    assert cache_copies_in_loop(stream._advance_fn.as_text(), shapes) == []
