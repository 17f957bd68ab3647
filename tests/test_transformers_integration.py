"""`mega_moe_layer.integrations.transformers` against the stock transformers MoE blocks (CPU, CI).

transformers is a test dependency (`pip install -e ".[test]"`): it is imported here, never by the
package. Tiny random models (hidden 256, 2 layers, 8-16 experts) come from
`scripts/swap_into_transformers.py`, so the script is exercised too.
"""
import copy
import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import transformers  # noqa: F401  (a test dependency: fail loudly, never skip)

from mega_moe_layer.integrations import transformers as mtf
from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.stats import format_table
from utils import assert_bitwise, assert_rel_rmse, parallel_launch

_spec = importlib.util.spec_from_file_location(
    "swap_into_transformers", os.path.join(os.path.dirname(__file__), "..", "scripts", "swap_into_transformers.py"))
swap_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swap_script)

FAMILIES = swap_script.FAMILIES
BF16 = dict(weight_format="bf16", act_format="bf16", combine_format="bf16")
U_BF16 = 2.0 ** -8          # bf16 unit roundoff (8-bit significand, round-to-nearest-even)


def bf16_vs_stock_bound(family: str, topk: int) -> float:
    """rel-RMSE bound of the swapped block (BF16 formats) against the stock block, both in bf16.

    Neither side is exact; they round at different places, each rounding a relative error <= u =
    2^-8 of the value it rounds. Stock (transformers' experts, bf16 tensors): gate/up (1),
    silu(gate) (1), silu * up (1), down projection (1), x top-k weight cast back to bf16 (1;
    Qwen3-MoE also rounds the weight itself to bf16: +1), and K `index_add_` accumulations in bf16
    (K). Ours (DESIGN steps 2-7): gate/up (1), h (1), y_k (1), the float32 sum of K rounded once (1).
    DeepSeek adds the shared expert (bitwise the same MLP on both sides) with one more rounding on
    each side (+2). Independent errors add in quadrature, and a GEMM or a sum of K experts with
    random signs carries the relative RMS error of its inputs (as in
    `reference.quantisation_error_bound`), so rel-RMSE <= sqrt(n) * u with n the roundings of both
    sides; u (not the RMS u / sqrt(3) of a uniform rounding error) leaves a margin of sqrt(3).
    DeepSeek K=4: n=15 -> 1.51e-2; Qwen3 K=4: n=14 -> 1.46e-2; Mixtral K=2: n=11 -> 1.30e-2.
    Measured (seed 0, 256 tokens): DeepSeek 3.9e-3, Qwen3 5.0e-3, Mixtral 4.4e-3, i.e. near the
    expected sqrt(n / 3) * u ~ 8e-3 and well inside.
    """
    stock = 5 + topk + (1 if family in BF16_ROUTER_WEIGHTS else 0)
    ours = 4
    shared = 2 if family in SHARED_EXPERT else 0
    return math.sqrt(stock + ours + shared) * U_BF16


#: Families whose stock router rounds the top-k weights to bf16 (the logits' dtype).
BF16_ROUTER_WEIGHTS = ("qwen3_moe", "qwen2_moe", "olmoe")
#: Families with a shared expert (bitwise the same MLP on both sides; Qwen2-MoE's sigmoid gate too).
SHARED_EXPERT = ("deepseek_v3", "glm4_moe", "deepseek_v2", "qwen2_moe")
#: Families whose stock router takes topk(sorted=False): the same sets, maybe another slot order.
UNSORTED_TOPK = ("deepseek_v3", "glm4_moe", "deepseek_v2")
STOCK_CLASS = {"deepseek_v3": "DeepseekV3MoE", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
               "mixtral": "MixtralSparseMoeBlock", "glm4_moe": "Glm4MoeMoE",
               "deepseek_v2": "DeepseekV2Moe", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
               "olmoe": "OlmoeSparseMoeBlock"}


def stock_and_swapped(family, fmt=BF16, seed=0):
    stock = swap_script.build_model(family, seed)
    model = copy.deepcopy(stock)
    summary = mtf.replace_moe_blocks(model, cfg_overrides=fmt)
    return stock, model, summary


def block_input(hidden, seed=1, shape=(4, 64)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, hidden, generator=g).to(torch.bfloat16)


def stock_route(block, x2d):
    """(topk_idx, topk_weights) of a stock transformers router (>= 5: a module returning
    (logits, weights, indices))."""
    _, w, idx = block.gate(x2d)
    return idx, w.float()


# ------------------------------------------------------------------------------------------- swap
@pytest.mark.parametrize("family", FAMILIES)
def test_replace_summary_and_shapes(family):
    stock, model, summary = stock_and_swapped(family)
    expected = STOCK_CLASS[family]
    assert summary["replaced"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert set(summary["classes"].values()) == {expected}
    for name, moe in summary["layers"].items():
        assert model.get_submodule(name) is moe and isinstance(moe, mtf.TransformersMegaMoE)
        assert not moe.return_router_logits            # transformers >= 5 blocks return the tensor
    assert not mtf.find_moe_blocks(model) and len(mtf.find_moe_blocks(stock)) == 2
    # Expert counts: SGLang's per-layer shape, int32 [E_local] on the layer's device.
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    counts = mtf.expert_counts(model)
    cfg = summary["layers"]["model.layers.0.mlp"].cfg
    for name, c in counts.items():
        assert c.dtype == torch.int32 and c.shape == (cfg.num_experts,) and c.device.type == "cpu"
        assert int(c.sum()) == 10 * cfg.topk, name
    assert "model.layers.0.mlp" in format_table({n: c.tolist() for n, c in counts.items()})


@pytest.mark.parametrize("family", FAMILIES)
def test_router_topk_identical(family):
    """Same top-k experts as the stock router, per row. DeepSeek-V3's stock router uses
    topk(sorted=False), so its slot order may differ: compared as sorted sets there; the softmax
    routers sort, so their order is compared too. Logits in the stock dtype (bf16 for Mixtral /
    Qwen3 in a bf16 model, float32 for DeepSeek) make even bf16 ties resolve the same way."""
    stock, model, summary = stock_and_swapped(family)
    x = block_input(256, shape=(512,))
    for name in summary["replaced"]:
        sb, mb = stock.get_submodule(name), model.get_submodule(name)
        with torch.no_grad():
            idx_s, w_s = stock_route(sb, x)
            idx_m, w_m = mb.router(x)
        if family in UNSORTED_TOPK:
            idx_s, order_s = idx_s.sort(dim=-1)
            idx_m, order_m = idx_m.sort(dim=-1)
            w_s, w_m = w_s.gather(1, order_s), w_m.gather(1, order_m)
        assert_bitwise(idx_m, idx_s.to(idx_m.dtype), f"{family} {name} top-k")
        if family in BF16_ROUTER_WEIGHTS:   # the stock router rounds the same float32 weights to bf16
            assert_bitwise(w_m.to(torch.bfloat16).float(), w_s, f"{family} weights")
        else:                         # DeepSeek: the normaliser sums in another slot order
            assert torch.allclose(w_m, w_s, rtol=1e-6, atol=0), f"{family} weights"


def test_router_qwen_without_norm_and_correction_bias_selection():
    """norm_topk_prob=False (the Qwen3MoeConfig default) and a DeepSeek bias that changes the
    selection (one group boosted) still pick the stock experts."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = swap_script.tiny_config("qwen3_moe", num_layers=1)
    cfg.norm_topk_prob = False
    block = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(torch.bfloat16)
    nn.init.normal_(block.gate.weight, std=0.05)
    moe = mtf.convert_block(block, cfg, BF16)
    x = block_input(256, shape=(300,))
    with torch.no_grad():
        idx_s, w_s = stock_route(block, x)
        idx_m, w_m = moe.router(x)
    assert torch.equal(idx_m, idx_s)
    assert_bitwise(w_m.to(torch.bfloat16).float(), w_s, "qwen3 weights without renormalisation")
    assert float(w_m.sum(-1).max()) < 0.99                      # not renormalised

    model = swap_script.build_model("deepseek_v3", num_layers=1)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.e_score_correction_bias[4:8] = 0.5             # group 1 always selected
    moe = mtf.convert_block(block, model.config, BF16)
    with torch.no_grad():
        idx_s, _ = stock_route(block, x)
        idx_m, _ = moe.router(x)
    assert torch.equal(idx_m.sort(-1)[0], idx_s.sort(-1)[0])
    assert bool(((idx_m >= 4) & (idx_m < 8)).any(dim=1).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_block_bf16_matches_stock(family):
    stock, model, summary = stock_and_swapped(family)
    topk = summary["layers"]["model.layers.0.mlp"].cfg.topk
    bound = bf16_vs_stock_bound(family, topk)
    x = block_input(256)
    for name in summary["replaced"]:
        with torch.no_grad():
            y_s, y_m = stock.get_submodule(name)(x), model.get_submodule(name)(x)
        assert y_m.shape == x.shape and y_m.dtype == x.dtype
        assert_rel_rmse(y_m, y_s, bound, f"{family} {name} bf16 vs stock")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wf,af", [("mxfp4", "fp8"), ("fp8", "fp8"), ("mxfp4", "fp4")])
def test_block_quantised_matches_stock(family, wf, af):
    """Quantised formats: the layer's `quantisation_error_bound` (vs exact), plus the stock block's
    own bf16 error in quadrature (both are independent). Measured (seed 0): mxfp4/fp8 0.17-0.21
    against 0.365; fp8/fp8 0.05-0.07 against 0.126; mxfp4/fp4 0.23-0.30 against 0.500."""
    fmt = dict(weight_format=wf, act_format=af, combine_format="bf16")
    stock, model, summary = stock_and_swapped(family, fmt)
    topk = summary["layers"]["model.layers.0.mlp"].cfg.topk
    bound = math.hypot(ref.quantisation_error_bound(wf, af, "bf16"), bf16_vs_stock_bound(family, topk))
    x = block_input(256)
    name = "model.layers.0.mlp"        # (both layers are checked in bf16 above)
    with torch.no_grad():
        y_s, y_m = stock.get_submodule(name)(x), model.get_submodule(name)(x)
    assert_rel_rmse(y_m, y_s, bound, f"{family} {name} {wf}/{af} vs stock")


def test_script_forward_and_generate():
    """The script's comparison: forward logits close, greedy generate() of 8 tokens runs."""
    r = swap_script.run_family("mixtral", ("bf16", "bf16", "bf16"), batch=2, prompt_len=6,
                               new_tokens=8, seed=0)
    assert r["rel_rmse"] < 2e-2 and r["tokens_agree"] >= 0.5, r
    assert all(sum(c) == (2 * 6 + 2 * 6 + 2 * 7) * 2 for c in r["counts"].values()), r["counts"]


# ------------------------------------------------------------------ transformers 4.x layouts
class _LegacyExpert(nn.Module):
    def __init__(self, H, I, names):
        super().__init__()
        g, u, d = names
        setattr(self, g, nn.Linear(H, I, bias=False))
        setattr(self, u, nn.Linear(H, I, bias=False))
        setattr(self, d, nn.Linear(I, H, bias=False))


class _FusedExperts(nn.Module):
    def __init__(self, gate_up, down, is_transposed, is_concatenated):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up), nn.Parameter(down)
        self.is_transposed, self.is_concatenated = is_transposed, is_concatenated


class MixtralSparseMoeBlock(nn.Module):
    """A transformers-4.x-shaped Mixtral block: nn.Linear gate, experts as ModuleList or variant
    fused layouts, forward returns (hidden, router_logits). Only its layout and return type
    matter here."""

    def __init__(self, gate_w, w13, w2, layout):
        super().__init__()
        E, two_i, H = w13.shape
        inter = two_i // 2
        self.top_k = 2
        self.gate = nn.Linear(H, E, bias=False, dtype=gate_w.dtype)
        self.gate.weight.data.copy_(gate_w)
        if layout.startswith("list"):
            names = ("w1", "w3", "w2") if layout == "list_w123" else ("gate_proj", "up_proj", "down_proj")
            self.experts = nn.ModuleList(_LegacyExpert(H, inter, names).to(w13.dtype) for _ in range(E))
            for e, mlp in enumerate(self.experts):
                getattr(mlp, names[0]).weight.data.copy_(w13[e, :inter])
                getattr(mlp, names[1]).weight.data.copy_(w13[e, inter:])
                getattr(mlp, names[2]).weight.data.copy_(w2[e])
        else:
            gu, down = w13, w2
            if layout == "fused_interleaved":
                gu = torch.stack([w13[:, :inter], w13[:, inter:]], dim=2).reshape(E, two_i, H)
            transposed = layout == "fused_transposed"
            if transposed:
                gu, down = gu.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
            self.experts = _FusedExperts(gu, down, transposed, layout != "fused_interleaved")

    def forward(self, hidden_states):
        router_logits = self.gate(hidden_states.view(-1, hidden_states.shape[-1]))
        return hidden_states, router_logits


@pytest.mark.parametrize("layout", ["list_w123", "list_gate_up_down", "fused_transposed", "fused_interleaved"])
def test_legacy_layouts_and_tuple_output(layout):
    stock, model, summary = stock_and_swapped("mixtral")
    sb = stock.model.layers[0].mlp
    w13, w2 = sb.experts.gate_up_proj.data, sb.experts.down_proj.data
    legacy = MixtralSparseMoeBlock(sb.gate.weight.data, w13, w2, layout)
    moe = mtf.convert_block(legacy, stock.config, BF16)
    assert moe.return_router_logits
    x = block_input(256, shape=(3, 7))
    with torch.no_grad():
        y, logits = moe(x)
        y_ref = summary["layers"]["model.layers.0.mlp"](x)
    assert_bitwise(y, y_ref, f"{layout} vs fused")
    assert_bitwise(logits, F.linear(x.view(-1, 256), sb.gate.weight), "router logits")


def test_deepseek_v2_greedy_and_qwen2_shared_gate():
    """DeepSeek-V2's plain greedy top-k (no groups); Qwen2-MoE's shared expert gate is honoured
    (a gate pushed to sigmoid ~ 0 removes the shared expert from both)."""
    import transformers as tf
    cfg = swap_script.tiny_config("deepseek_v2", num_layers=1)
    cfg.topk_method = "greedy"
    torch.manual_seed(0)
    block = tf.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe(cfg).to(torch.bfloat16)
    nn.init.normal_(block.gate.weight, std=0.05)
    moe = mtf.convert_block(block, cfg, BF16)
    assert moe.router.n_group is None
    x = block_input(256, shape=(300,))
    with torch.no_grad():
        idx_s, w_s = stock_route(block, x)
        idx_m, w_m = moe.router(x)
    assert torch.equal(idx_m.sort(-1)[0], idx_s.sort(-1)[0])
    cfg.topk_method = "noaux_tc"
    with pytest.raises(ValueError, match="topk_method='noaux_tc'"):
        mtf.convert_block(block, cfg, BF16)

    model = swap_script.build_model("qwen2_moe", num_layers=1)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.shared_expert_gate.weight.fill_(0.0)
        block.shared_expert_gate.weight[0, 0] = -1e4         # x[:, 0] > 0 rows: sigmoid -> 0
    moe = mtf.convert_block(block, model.config, BF16)
    x = block_input(256, shape=(2, 32))
    with torch.no_grad():
        y_s, y_m = block(x), moe(x)
    assert_rel_rmse(y_m, y_s, bf16_vs_stock_bound("qwen2_moe", 4), "qwen2 gated shared expert")


def test_gpt_oss_refused_naming_what_is_missing():
    import transformers as tf
    cfg = tf.GptOssConfig(vocab_size=1000, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          num_local_experts=8, num_experts_per_tok=2)
    model = tf.GptOssForCausalLM(cfg)
    for call in (lambda: mtf.replace_moe_blocks(model, cfg_overrides=BF16),
                 lambda: mtf.convert_block(model.model.layers[0].mlp, cfg, BF16)):
        with pytest.raises(ValueError, match=r"GptOssMLP.*not supported.*expert biases.*clamped SwiGLU"):
            call()


def test_bad_inputs():
    stock, _, _ = stock_and_swapped("mixtral")
    with pytest.raises(ValueError, match="cannot be overridden"):
        mtf.replace_moe_blocks(copy.deepcopy(stock), cfg_overrides={"hidden": 512})
    with pytest.raises(ValueError, match="no supported MoE block"):
        mtf.replace_moe_blocks(nn.Sequential(nn.Linear(4, 4)))
    stock.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        mtf.replace_moe_blocks(stock)


# ------------------------------------------------------------------------------ two gloo ranks
def _two_rank_worker(ctx):
    """Each rank swaps the same models with group=WORLD (E_local = E / 2). Block level: rank 1 is
    idle ([1, 0, H]); model level: ranks run different batches. Each result must equal, bitwise, a
    one-rank swap on the same input (the torch backend is the reference, whose rows do not depend
    on the batch); both ranks call each MoE block the same number of times."""
    rank = ctx.rank
    solo_groups = [dist.new_group([r]) for r in range(ctx.world_size)]  # collective: all ranks
    out = {}
    for family in FAMILIES:
        model = swap_script.build_model(family, seed=0)
        solo = copy.deepcopy(model)
        mtf.replace_moe_blocks(solo, cfg_overrides=BF16, group=solo_groups[rank])
        summary = mtf.replace_moe_blocks(model, cfg_overrides=BF16, group=ctx.group)
        moe = summary["layers"]["model.layers.0.mlp"]
        E, K, El = moe.cfg.num_experts, moe.cfg.topk, moe.experts.num_local_experts
        assert El == E // 2
        x = block_input(256, seed=5, shape=(2, 5)) if rank == 0 else torch.empty(1, 0, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            y = moe(x)
            y_solo = solo.get_submodule("model.layers.0.mlp")(x)
        assert y.shape == x.shape
        assert_bitwise(y, y_solo, f"rank {rank} {family} block")
        pairs = moe.experts.global_expert_counts()                   # collective
        assert int(pairs.sum()) == 10 * K and pairs.shape == (E,)

        ids = torch.randint(3, 1000, (2, 6) if rank == 0 else (1, 3), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            logits = model(ids).logits
            logits_solo = solo(ids).logits
        assert_bitwise(logits, logits_solo, f"rank {rank} {family} logits")
        counts = mtf.expert_counts(model)
        total = torch.stack(list(counts.values())).to(torch.int64)
        dist.all_reduce(total, group=ctx.group)
        assert all(c.dtype == torch.int32 and c.shape == (El,) for c in counts.values())
        assert total.sum(dim=1).tolist() == [(12 + 3) * K] * 2, total
        out[family] = (tuple(y.shape), total.sum().item())
    return out


def test_two_ranks_with_idle_rank():
    results = parallel_launch(2, _two_rank_worker, timeout=120)
    assert results[1]["mixtral"][0] == (1, 0, 256)
