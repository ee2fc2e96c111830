"""MLP and MoE: ragged vs dense expert compute (values + gradients), parity with transformers'
Jamba / Nemotron-H blocks, and the auxiliary losses against ``load_balancing_loss_func``."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jamba_jax.config import MLPConfig, MoEConfig
from jamba_jax.layers.mlp import MLP
from jamba_jax.layers.moe import MoE, RoutingBias
from tests.helpers import rel_l2, run_on_simulated_devices

D, F, B, L = 16, 32, 2, 7


def _randomize(model, seed, scale=0.3):
    """Set every variable (params and the routing bias) to fresh N(0, scale^2) values: the 0.02 init
    makes routing dull and a zero correction bias would test nothing."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var.set_value(jnp.asarray(rng.normal(0.0, scale, var.shape), var.dtype))
    return model


def _abstract(make):
    """Build a module without running its initializers (eager per-shape init is slow on CPU)."""
    return nnx.eval_shape(make)


def _x(seed, shape=(B, L, D)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _make_moe(cfg, seed):
    moe = _randomize(_abstract(lambda: MoE(cfg, D, rngs=nnx.Rngs(seed))), seed + 100)
    if moe.e_score_correction_bias is not None:
        assert float(jnp.max(jnp.abs(moe.e_score_correction_bias[...]))) > 0.1
    return moe


def _loss_and_grads(moe, x, ct, impl):
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x, impl=impl)
        return jnp.sum(y * ct) + aux["load_balancing_loss"] + 0.1 * aux["router_z_loss"], (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, aux, grads


CASES = {
    "softmax_top2_of_4": MoEConfig(n_experts=4, top_k=2, d_ff=F),
    "softmax_renorm": MoEConfig(n_experts=6, top_k=3, d_ff=F, normalize_top_k=True, activation="geglu"),
    "sigmoid_groups_bias_shared": MoEConfig(n_experts=8, top_k=3, d_ff=F, router="sigmoid", normalize_top_k=True,
                                            routed_scaling=2.5, n_groups=4, top_k_groups=2, shared_d_ff=24,
                                            activation="relu2"),
    "relu2_softmax": MoEConfig(n_experts=5, top_k=2, d_ff=F, activation="relu2", shared_d_ff=8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ragged_matches_dense(name):
    cfg = CASES[name]
    moe = _make_moe(cfg, seed=len(name))
    x = _x(1 + len(name))
    ct = _x(2 + len(name))
    y_r, aux_r, (gp_r, gx_r) = _loss_and_grads(moe, x, ct, "ragged")
    y_d, aux_d, (gp_d, gx_d) = _loss_and_grads(moe, x, ct, "dense")
    assert y_r.shape == x.shape and y_r.dtype == jnp.float32
    assert rel_l2(y_r, y_d) < 1e-5
    for k in aux_r:
        assert aux_r[k].shape == () and aux_r[k].dtype == jnp.float32
        np.testing.assert_allclose(aux_r[k], aux_d[k], rtol=1e-6)
    assert rel_l2(gx_r, gx_d) < 1e-5
    leaves_r = jax.tree_util.tree_leaves_with_path(gp_r)
    leaves_d = dict(jax.tree_util.tree_leaves_with_path(gp_d))
    names = {jax.tree_util.keystr(p) for p, _ in leaves_r}
    assert any("router" in n for n in names) and any("down_proj" in n for n in names)
    assert not any("e_score_correction_bias" in n for n in names)
    for path, g in leaves_r:
        assert rel_l2(g, leaves_d[path]) < 1e-5, jax.tree_util.keystr(path)
    # the grads must be finite
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves_r)


def test_param_layout():
    cfg = CASES["sigmoid_groups_bias_shared"]
    moe = _abstract(lambda: MoE(cfg, D, rngs=nnx.Rngs(0)))
    assert moe.router.kernel.shape == (D, 8) and moe.router.bias is None
    assert moe.router.kernel.out_sharding == ("embed", None)
    assert moe.up_proj.shape == (8, D, F) and moe.up_proj.out_sharding == ("expert", "embed", "mlp")
    assert moe.down_proj.shape == (8, F, D) and moe.down_proj.out_sharding == ("expert", "mlp", "embed")
    assert not hasattr(moe, "gate_proj")
    assert isinstance(moe.e_score_correction_bias, RoutingBias)
    assert not isinstance(moe.e_score_correction_bias, nnx.Param)
    assert "e_score_correction_bias" not in nnx.state(moe, nnx.Param)
    assert moe.shared_expert.up_proj.kernel.shape == (D, 24)
    gated = _abstract(lambda: MoE(CASES["softmax_top2_of_4"], D, rngs=nnx.Rngs(0)))
    assert gated.gate_proj.shape == (4, D, F) and gated.e_score_correction_bias is None
    assert gated.shared_expert is None


def test_bf16_jit_smoke():
    moe = MoE(CASES["softmax_top2_of_4"], D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y, aux = nnx.jit(lambda m, x: m(x))(moe, _x(3).astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and aux["load_balancing_loss"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


# ------------------------------------------------------------------------------------------ HF parity
def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def test_aux_losses_match_transformers():
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

    for cfg in (CASES["softmax_top2_of_4"], CASES["softmax_renorm"]):
        moe = _make_moe(cfg, seed=5)
        x = _x(6, (3, 11, D))
        _, aux = moe(x)
        logits = moe.router_logits(x.reshape(-1, D))
        ref = load_balancing_loss_func((_t(logits),), cfg.n_experts, cfg.top_k)
        np.testing.assert_allclose(float(aux["load_balancing_loss"]), float(ref), rtol=1e-6, atol=1e-6)
        lse = torch.logsumexp(_t(logits).double(), dim=-1)
        np.testing.assert_allclose(float(aux["router_z_loss"]), float((lse ** 2).mean()), rtol=1e-6)


def test_jamba_moe_parity():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    hf_cfg = JambaConfig(hidden_size=D, intermediate_size=F, num_experts=4, num_experts_per_tok=2,
                         hidden_act="silu", experts_implementation="eager")
    torch.manual_seed(0)
    block = JambaSparseMoeBlock(hf_cfg).float().eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe = _abstract(lambda: MoE(CASES["softmax_top2_of_4"], D, rngs=nnx.Rngs(0)))
    moe.router.kernel.set_value(jnp.asarray(block.router.weight.detach().numpy().T))
    gate_up = block.experts.gate_up_proj.detach().numpy()  # (E, 2F, D): [gate; up]
    moe.gate_proj.set_value(jnp.asarray(gate_up[:, :F].transpose(0, 2, 1)))
    moe.up_proj.set_value(jnp.asarray(gate_up[:, F:].transpose(0, 2, 1)))
    moe.down_proj.set_value(jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1)))  # (E, D, F)
    x = _x(7)
    with torch.no_grad():
        ref = block(_t(x)).numpy()
    y, _ = moe(x)
    assert rel_l2(y, ref) < 1e-5


def test_nemotron_h_moe_parity():
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    cfg = CASES["sigmoid_groups_bias_shared"]
    hf_cfg = NemotronHConfig(hidden_size=D, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=F,
                             moe_shared_expert_intermediate_size=24, n_group=4, topk_group=2, norm_topk_prob=True,
                             routed_scaling_factor=2.5, mlp_hidden_act="relu2", mlp_bias=False,
                             experts_implementation="eager")
    torch.manual_seed(1)
    block = NemotronHMoE(hf_cfg).float().eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    moe = _abstract(lambda: MoE(cfg, D, rngs=nnx.Rngs(0)))
    moe.router.kernel.set_value(jnp.asarray(block.gate.weight.detach().numpy().T))
    moe.e_score_correction_bias.set_value(jnp.asarray(block.gate.e_score_correction_bias.numpy()))
    moe.up_proj.set_value(jnp.asarray(block.experts.up_proj.detach().numpy().transpose(0, 2, 1)))
    moe.down_proj.set_value(jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1)))
    moe.shared_expert.up_proj.kernel.set_value(jnp.asarray(block.shared_experts.up_proj.weight.detach().numpy().T))
    moe.shared_expert.down_proj.kernel.set_value(jnp.asarray(block.shared_experts.down_proj.weight.detach().numpy().T))
    x = _x(8)
    with torch.no_grad():
        ref = block(_t(x)).numpy()
        _, w_ref, i_ref = block.gate(_t(x))
    y, _ = moe(x)
    assert rel_l2(y, ref) < 1e-5
    # routing itself, as sets per token (HF's topk is unsorted)
    from jamba_jax.layers.moe import route
    w, i = route(moe.router_logits(x.reshape(-1, D)), cfg, moe.e_score_correction_bias[...])
    order_ref, order = np.argsort(i_ref.numpy(), -1), np.argsort(np.asarray(i), -1)
    np.testing.assert_array_equal(np.take_along_axis(i_ref.numpy(), order_ref, -1),
                                  np.take_along_axis(np.asarray(i), order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref.numpy(), order_ref, -1), rtol=1e-6)


# ------------------------------------------------------------------------------------------ MLP
def _load_linear(dst, src):
    dst.kernel.set_value(jnp.asarray(src.weight.detach().numpy().T))
    if src.bias is not None:
        dst.bias.set_value(jnp.asarray(src.bias.detach().numpy()))


def test_mlp_matches_jamba_mlp():
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMLP

    torch.manual_seed(2)
    ref_mlp = JambaMLP(JambaConfig(hidden_size=D, intermediate_size=F, hidden_act="silu")).float()
    mlp = _abstract(lambda: MLP(MLPConfig(d_ff=F, activation="swiglu"), D, rngs=nnx.Rngs(0)))
    assert mlp.gate_proj.kernel.out_sharding == ("embed", "mlp")
    assert mlp.down_proj.kernel.out_sharding == ("mlp", "embed")
    for name in ("gate_proj", "up_proj", "down_proj"):
        _load_linear(getattr(mlp, name), getattr(ref_mlp, name))
    x = _x(9)
    with torch.no_grad():
        ref = ref_mlp(_t(x)).numpy()
    assert rel_l2(mlp(x), ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_matches_nemotron_h_mlp(bias):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

    torch.manual_seed(3)
    hf_cfg = NemotronHConfig(hidden_size=D, intermediate_size=F, mlp_hidden_act="relu2", mlp_bias=bias)
    ref_mlp = NemotronHMLP(hf_cfg).float()
    for p in ref_mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mlp = _abstract(lambda: MLP(MLPConfig(d_ff=F, activation="relu2", bias=bias), D, rngs=nnx.Rngs(0)))
    assert not hasattr(mlp, "gate_proj")
    _load_linear(mlp.up_proj, ref_mlp.up_proj)
    _load_linear(mlp.down_proj, ref_mlp.down_proj)
    x = _x(10)
    with torch.no_grad():
        ref = ref_mlp(_t(x)).numpy()
    assert rel_l2(mlp(x), ref) < 1e-5


# ------------------------------------------------------------------------------------------ under a mesh
MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jamba_jax.config import MoEConfig
from jamba_jax.layers import moe as moe_lib
from jamba_jax.layers.common import activation_sharding
from jamba_jax.train.config import MeshConfig, load_config
from jamba_jax.train.sharding import logical_to_spec, make_mesh, state_shardings
from pallas_kernels.ragged_dot import Kernels, grouped_vjp, reference_kernels

default = load_config(None, []).rules  # the trainer's table: batch over data, fsdp, expert; mlp over tensor
batch_without_expert = dict(default, batch=("data", "fsdp"))  # the expert axis copies tokens
batch_over_tensor = dict(default, batch=("data", "fsdp", "expert", "tensor"))  # tensor splits rows and d_ff
# (mesh data, fsdp, tensor, expert), rules, batch rows, then what each device's grouped compute gets:
# (batch rows, experts held)
CASES = [((2, 2, 2, 1), default, 8, (2, 8)), ((2, 1, 1, 4), default, 8, (4, 2)), ((1, 1, 2, 4), default, 8, (8, 2)),
         ((2, 1, 1, 4), batch_without_expert, 8, (4, 2)), ((1, 1, 2, 4), batch_over_tensor, 8, (8, 2)),
         ((1, 2, 1, 4), default, 2, (1, 2))]  # 2 rows: the batch over fsdp only, tokens copied over expert
rng = np.random.default_rng(0)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
seen = []
grouped = moe_lib.grouped_experts

def recording(x, *args, **kw):
    seen.append((x.shape[0], args[3].shape[0]))  # batch rows, experts held
    return grouped(x, *args, **kw)

def host_kernels():
    # the reference kernels behind pure_callback: opaque to JAX's typing, as the Mosaic GPU kernels are
    def host(f):
        def g(a, b, gs):
            return jax.pure_callback(lambda *v: np.asarray(f(*v)), jax.eval_shape(f, a, b, gs), a, b, gs)
        return g
    ref = reference_kernels()
    return grouped_vjp(Kernels(host(ref.forward), host(ref.input_grad), host(ref.weight_grad)))

moe_lib.grouped_experts = recording
xla_ragged_dot = moe_lib.ragged_dot
for cfg in (MoEConfig(n_experts=8, top_k=2, d_ff=32),
            MoEConfig(n_experts=8, top_k=3, d_ff=32, router="sigmoid", normalize_top_k=True, n_groups=4,
                      top_k_groups=2, activation="relu2", shared_d_ff=16)):
    moe = nnx.eval_shape(lambda: moe_lib.MoE(cfg, 16, rngs=nnx.Rngs(0)))
    for _, var in nnx.iter_graph(moe):
        if isinstance(var, nnx.Variable):
            var.set_value(jnp.asarray(rng.normal(0.0, 0.3, var.shape), var.dtype))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x_all = jnp.asarray(rng.normal(size=(8, 12, 16)), jnp.float32)
    ct_all = jnp.asarray(rng.normal(size=(8, 12, 16)), jnp.float32)
    for kernels in ("xla", "host"):
        moe_lib.ragged_dot = xla_ragged_dot if kernels == "xla" else host_kernels()
        for shape, rules, b, expected in CASES if kernels == "xla" else CASES[:2] + CASES[3:4]:
            x, ct = x_all[:b], ct_all[:b]

            def loss(params, x):
                y, aux = nnx.merge(graphdef, params, rest)(x)
                return jnp.sum(y * ct) + aux["load_balancing_loss"] + 0.1 * aux["router_z_loss"]

            want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
            mesh = make_mesh(MeshConfig(*shape))
            placed = jax.device_put(params, state_shardings(params, mesh, rules))
            rule = lambda names, shape, rules=rules: NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh))
            seen.clear()
            with activation_sharding(rule):
                got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(placed, x)
            assert seen[-1] == expected, (shape, kernels, seen)
            errs = [rel(got[0], want[0])] + [rel(a, b) for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]))]
            assert max(errs) < 1e-5, (shape, kernels, errs)
        moe_lib.ragged_dot = xla_ragged_dot
print("ok")
"""


def test_moe_under_a_mesh_matches_one_device():
    """Under a trainer's mesh (8 simulated CPU devices) each device routes its own rows through the
    experts it holds: data + FSDP + tensor, data + expert, tensor + expert (tokens gathered over the
    expert axis), tokens copied over the expert axis, rows split over tensor too, a batch too small for
    every batch axis; and with host-callback kernels, as opaque to JAX as the Mosaic GPU ones. Values
    and the gradients of every weight and of x equal the unsharded layer's."""
    assert run_on_simulated_devices(MESH_SCRIPT, 8).strip().endswith("ok")
