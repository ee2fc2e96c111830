"""LanguageModel mechanics: rematerialisation and per-layer hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jamba_jax.config import MLPConfig, Mamba2Config, ModelConfig
from jamba_jax.model import LanguageModel
from tests.helpers import rel_l2

CFG = ModelConfig(vocab_size=50, d_model=16, layers=("mamba2", "mlp") * 2,
                  mamba2=Mamba2Config(n_heads=4, head_dim=8, d_state=4, chunk_size=8), mlp=MLPConfig(d_ff=32))
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 11)))


def _grads(remat):
    graphdef, params = nnx.split(LanguageModel(CFG, rngs=nnx.Rngs(0), remat=remat))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(IDS) ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(remat):
    for a, b in zip(_grads(remat), _grads("none")):
        assert rel_l2(a, b) < 1e-6


def test_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat='most'"):
        LanguageModel(CFG, rngs=nnx.Rngs(0), remat="most")


def test_per_layer_hidden_states_follow_the_stack():
    model = LanguageModel(CFG, rngs=nnx.Rngs(1))
    final, _, per_layer = model.hidden_states(IDS, return_all=True)
    assert per_layer.shape == (CFG.n_layers, 2, 11, 16)
    assert rel_l2(model.final_norm(per_layer[-1]), final) < 1e-6
    # Sublayer 0 applied to the embedding gives entry 0 (the stack stores repetition-major order).
    block0 = nnx.merge(*nnx.split(model.blocks[0]))  # stacked over repetitions
    graphdef, state = nnx.split(block0)
    first = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))
    h0, _ = first(model.embed_tokens(IDS), segment_ids=None, positions=None)
    assert rel_l2(per_layer[0], h0) < 1e-6
    second_rep = nnx.merge(graphdef, jax.tree.map(lambda x: x[1], state))
    h2, _ = second_rep(per_layer[1], segment_ids=None, positions=None)
    assert rel_l2(per_layer[2], h2) < 1e-6


def test_lists_and_numpy_ids_are_accepted():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    want = model(IDS, segment_ids=jnp.ones_like(IDS))
    ids, segs = np.asarray(IDS).tolist(), np.ones(IDS.shape, np.int32).tolist()
    np.testing.assert_array_equal(model(ids, segment_ids=segs), want)
