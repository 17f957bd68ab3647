"""MegaMoEExperts / TopKRouter / MegaMoE on one process: numerics, statistics, bad inputs."""
import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.kernels import reference as ref
from utils import assert_bitwise, assert_rel_rmse, make_inputs, make_weights

FORMATS = [(w, a, c) for w in ("mxfp4", "fp8", "bf16") for a in ("fp8", "fp4", "bf16") for c in ("bf16", "fp8")]


def build(weight_format="mxfp4", act_format="fp8", combine_format="bf16", group=32, hidden=512, **kw):
    cfg = mml.MegaMoEConfig(hidden=hidden, intermediate=256, num_experts=8, topk=3, max_tokens_per_rank=64,
                            weight_format=weight_format, act_format=act_format,
                            combine_format=combine_format, act_group_size=group, **kw)
    m = mml.MegaMoEExperts(cfg)
    w13, w2 = make_weights(cfg)
    m.load_weights(w13, w2)
    return cfg, m, w13, w2


@pytest.mark.parametrize("wf,af,cf", FORMATS)
def test_layer_vs_reference_and_float64(wf, af, cf):
    cfg, m, w13, w2 = build(wf, af, cf, activation_clamp=2.0 if af == "fp4" else None)
    x, idx, w = make_inputs(cfg, 37, seed=3, mask_frac=0.1)
    y = m(x, idx, w)
    y_ref = ref.moe_reference(x, idx, w, m.w13.dequantize(), m.w2.dequantize(), act_format=af,
                              combine_format=cf, act_group_size=32,
                              activation_clamp=cfg.activation_clamp)
    assert_bitwise(y, y_ref, f"{wf}/{af}/{cf} vs reference")
    y64 = ref.dense_moe_float64(x, idx, w, w13, w2, cfg.activation_clamp)
    assert_rel_rmse(y, y64, ref.quantisation_error_bound(wf, af, cf), f"{wf}/{af}/{cf} vs float64")


def test_fp8_combine_hidden_multiple_of_128_only():
    """H = 640: five FP8-combine scale groups, not a whole number of int32 words (the last word is
    padded); the layer still equals the reference bitwise."""
    cfg, m, w13, w2 = build("mxfp4", "fp8", "fp8", hidden=640)
    x, idx, w = make_inputs(cfg, 13, seed=6, mask_frac=0.1)
    y_ref = ref.moe_reference(x, idx, w, m.w13.dequantize(), m.w2.dequantize(), combine_format="fp8")
    assert_bitwise(m(x, idx, w), y_ref, "H 640 fp8 combine vs reference")
    q, sf = ref.combine_quantize(torch.randn(3, 640).to(torch.bfloat16))
    assert sf.shape == (3, 2) and bool(((sf[:, 1] >> 8) == 0).all())   # groups 5..7 padded with 0


def test_group_128_and_int32_ids():
    cfg, m, _, _ = build(group=128)
    x, idx, w = make_inputs(cfg, 9, seed=4, idx_dtype=torch.int32)
    y = m(x, idx, w)
    y_ref = ref.moe_reference(x, idx, w, m.w13.dequantize(), m.w2.dequantize(), act_group_size=128)
    assert_bitwise(y, y_ref, "group 128")


def test_masked_rows_zero_and_stats():
    cfg, m, _, _ = build()
    x, idx, w = make_inputs(cfg, 10, seed=5)
    idx[3] = -1
    y = m(x, idx, w)
    assert bool((y[3] == 0).all())
    expect = torch.bincount(idx[idx >= 0], minlength=8).to(torch.int32)
    assert torch.equal(m.last_local_expert_recv_stats, expect)
    m(x, idx, w)
    assert torch.equal(m.cumulative_local_expert_recv_stats, 2 * expect)
    assert torch.equal(m.global_expert_counts(), expect.long())


def test_idle_call_and_null_pointer():
    cfg, m, _, _ = build()
    x = torch.empty(0, cfg.hidden, dtype=torch.bfloat16)
    assert x.data_ptr() == 0
    y = m(x, torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3))
    assert y.shape == (0, cfg.hidden) and y.dtype == torch.bfloat16
    assert int(m.cumulative_local_expert_recv_stats.sum()) == 0


def test_max_tokens_and_skew():
    cfg, m, _, _ = build()
    x, idx, w = make_inputs(cfg, 64, seed=6, routing="skewed", target_expert=5)
    y = m(x, idx, w)
    assert int(m.last_local_expert_recv_stats[5]) == 64
    y_ref = ref.moe_reference(x, idx, w, m.w13.dequantize(), m.w2.dequantize())
    assert_bitwise(y, y_ref, "skewed")


@pytest.mark.parametrize("arg,bad,exc,match", [
    ("x", lambda x, i, w: (x.float(), i, w), TypeError, "x: expected dtype torch.bfloat16"),
    ("x", lambda x, i, w: (x[:, :256].contiguous(), i, w), ValueError, r"x: expected shape \[T, 512\]"),
    ("x", lambda x, i, w: (x.t().contiguous().t(), i, w), ValueError, "x: expected a contiguous"),
    ("x", lambda x, i, w: (torch.cat([x] * 8), torch.cat([i] * 8), torch.cat([w] * 8)), ValueError,
     "max_tokens_per_rank=64"),
    ("topk_idx", lambda x, i, w: (x, i.float(), w), TypeError, "topk_idx: expected dtype"),
    ("topk_idx", lambda x, i, w: (x, i[:, :2].contiguous(), w), ValueError, "topk_idx: expected shape"),
    ("topk_idx", lambda x, i, w: (x, i.clone().fill_(8), w), ValueError, "topk_idx: row 0"),
    ("topk_idx", lambda x, i, w: (x, i.clone().fill_(-2), w), ValueError, "outside"),
    ("topk_weights", lambda x, i, w: (x, i, w.double()), TypeError, "topk_weights: expected dtype"),
    ("topk_weights", lambda x, i, w: (x, i, w[:5].contiguous()), ValueError, "topk_weights: expected shape"),
    ("x", lambda x, i, w: (x.numpy() if False else [1], i, w), TypeError, "x: expected a torch.Tensor"),
])
def test_bad_inputs(arg, bad, exc, match):
    cfg, m, _, _ = build()
    x, idx, w = make_inputs(cfg, 10, seed=7)
    before = m.cumulative_local_expert_recv_stats.clone()
    with pytest.raises(exc, match=match):
        m(*bad(x, idx, w))
    assert torch.equal(m.cumulative_local_expert_recv_stats, before)


def test_validation_off_drops_and_counts():
    cfg = mml.MegaMoEConfig(hidden=512, intermediate=256, num_experts=8, topk=3, max_tokens_per_rank=64)
    m = mml.MegaMoEExperts(cfg, validate=False)
    m.load_weights(*make_weights(cfg))
    x, idx, w = make_inputs(cfg, 6, seed=8)
    bad = idx.clone()
    bad[2, 1] = 99
    y = m(x, bad, w)
    masked = idx.clone()
    masked[2, 1] = -1
    assert_bitwise(y, m.__class__.__call__(m, x, masked, w), "dropped pair equals a masked slot")
    with pytest.raises(RuntimeError, match="1 .* pairs"):
        m.check_errors()


def test_load_weights_errors_and_local_slice():
    cfg = mml.MegaMoEConfig(hidden=512, intermediate=256, num_experts=8, topk=3, weight_format="bf16")
    m = mml.MegaMoEExperts(cfg)
    w13, w2 = make_weights(cfg)
    with pytest.raises(RuntimeError, match="load_weights"):
        m(*make_inputs(cfg, 2, seed=0))
    with pytest.raises(ValueError, match=r"w13: expected shape"):
        m.load_weights(w13[:, :100], w2)
    with pytest.raises(ValueError, match=r"w2: expected shape \[8 or 8"):
        m.load_weights(w13, w2[:4])
    with pytest.raises(TypeError, match="w2"):
        m.load_weights(w13, w2.to(torch.int32))
    m.load_weights(w13, w2)
    assert torch.equal(m.w13.data, w13)


def test_nvshmem_backend_reports_reason():
    cfg = mml.MegaMoEConfig(hidden=512, intermediate=256, num_experts=8, topk=3)
    ok, reason = mml.MegaMoEExperts.is_supported(cfg, "nvshmem", "cpu")
    assert not ok and "CUDA" in reason
    with pytest.raises(ValueError, match="nvshmem"):
        mml.MegaMoEExperts(cfg, backend="nvshmem")
    with pytest.raises(ValueError, match="backend"):
        mml.MegaMoEExperts(cfg, backend="nccl")


# --------------------------------------------------------------------------------------- router
def test_softmax_router_matches_manual():
    r = mml.TopKRouter(64, 8, 2, scoring="softmax", norm_topk_prob=False)
    x = torch.randn(5, 64)
    idx, w = r(x)
    p = torch.softmax(x @ r.weight.t(), -1)
    top = p.topk(2, -1)
    assert torch.equal(idx, top.indices) and torch.allclose(w, top.values)
    r.norm_topk_prob = True
    assert torch.allclose(r(x)[1].sum(-1), torch.ones(5))


def test_sigmoid_grouped_router():
    r = mml.TopKRouter(64, 16, 4, scoring="sigmoid", n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, use_correction_bias=True)
    r.e_score_correction_bias[:4] = 10.0          # group 0 always chosen by selection only
    x = torch.randn(7, 64)
    idx, w = r(x)
    groups = idx // 4
    assert bool((groups == 0).any(dim=1).all())
    assert bool(((groups.unsqueeze(-1) == groups.unsqueeze(-2)).sum(-1) >= 1).all())
    assert all(len(set(g.tolist())) <= 2 for g in groups)          # at most topk_group groups
    assert torch.allclose(w.sum(-1), torch.full((7,), 2.5))         # normalised, then scaled
    s = torch.sigmoid(x @ r.weight.t())
    assert torch.allclose(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5)


def test_router_bad_args():
    with pytest.raises(ValueError, match="scoring"):
        mml.TopKRouter(8, 4, 2, scoring="relu")
    with pytest.raises(ValueError, match="n_group"):
        mml.TopKRouter(8, 6, 2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="topk"):
        mml.TopKRouter(8, 4, 5)


def test_megamoe_with_shared_expert():
    cfg = mml.MegaMoEConfig(hidden=512, intermediate=256, num_experts=8, topk=2, weight_format="bf16",
                            act_format="bf16")
    moe = mml.MegaMoE(cfg, shared_intermediate=128)
    moe.experts.load_weights(*make_weights(cfg))
    x = torch.randn(6, 512).bfloat16()
    idx, w = moe.router(x)
    routed = moe.experts(x, idx, w)
    assert torch.equal(moe(x), routed + moe.shared_experts(x))
