"""2- and 4-rank gloo runs of the torch backend through the one launcher (tests/utils.py).

Every rank holds the full bf16 weights (same seed), so it can compute the single-process
reference of its own tokens; the expert-parallel result must equal it bitwise.
"""
import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.kernels import reference as ref
from utils import assert_bitwise, make_inputs, make_weights, parallel_launch

SCENARIOS = ["uniform", "one_idle", "all_idle", "skewed", "masked", "repeated_stats",
             "local_weights", "fp4_fp8combine", "bf16_acts", "bad_input_all_ranks"]


def _cfg(**kw):
    base = dict(hidden=512, intermediate=256, num_experts=8, topk=3, max_tokens_per_rank=48)
    return mml.MegaMoEConfig(**{**base, **kw})


def _check_call(m, cfg, w13_f, w2_f, x, idx, w):
    y = m(x, idx, w)
    assert y.shape == (x.shape[0], cfg.hidden)
    y_ref = ref.moe_reference(x, idx, w, w13_f, w2_f, act_format=cfg.act_format,
                              combine_format=cfg.combine_format, act_group_size=cfg.act_group_size,
                              activation_clamp=cfg.activation_clamp)
    assert_bitwise(y, y_ref, f"rank output T={x.shape[0]}")
    return idx


def _scenario(ctx, name):
    R, r = ctx.world_size, ctx.rank
    kw = {"fp4_fp8combine": dict(act_format="fp4", combine_format="fp8", weight_format="fp8"),
          "bf16_acts": dict(act_format="bf16", weight_format="bf16", activation_clamp=1.5)}.get(name, {})
    cfg = _cfg(**kw)
    w13, w2 = make_weights(cfg)
    m = mml.MegaMoEExperts(cfg, group=ctx.group)
    El = cfg.num_experts // R
    if name == "local_weights":
        m.load_weights(w13[r * El:(r + 1) * El], w2[r * El:(r + 1) * El])
    else:
        m.load_weights(w13, w2)
    w13_f = mml.quantize_weight(w13, cfg.weight_format).dequantize()
    w2_f = mml.quantize_weight(w2, cfg.weight_format).dequantize()
    all_idx = []                       # per call: every rank's idx, to recount stats on the host

    def call(T_of_rank, seed, **inp):
        idxs = []
        for rr in range(R):
            x, idx, w = make_inputs(cfg, T_of_rank(rr), seed=seed * 100 + rr, **inp)
            idxs.append(idx)
            if rr == r:
                mine = (x, idx, w)
        _check_call(m, cfg, w13_f, w2_f, *mine)
        all_idx.append(torch.cat(idxs))

    if name in ("uniform", "local_weights", "fp4_fp8combine", "bf16_acts"):
        call(lambda rr: 5 + 3 * rr, 1)
    elif name == "one_idle":
        call(lambda rr: 0 if rr == 1 else 11, 2)
    elif name == "all_idle":
        call(lambda rr: 0, 3)
    elif name == "skewed":   # every token of every rank to the last rank's first expert
        call(lambda rr: cfg.max_tokens_per_rank, 4, routing="skewed", target_expert=cfg.num_experts - El)
    elif name == "masked":
        call(lambda rr: 9, 5, mask_frac=0.4)
    elif name == "repeated_stats":
        for i in range(5):
            call(lambda rr: (7 * i + 3 * rr) % 13, 10 + i, mask_frac=0.2)
    elif name == "bad_input_all_ranks":
        x, idx, w = make_inputs(cfg, 4, seed=1)
        idx[1, 0] = cfg.num_experts
        try:
            m(x, idx, w)
        except ValueError as e:
            assert "topk_idx: row 1" in str(e)
        else:
            raise AssertionError("out-of-range id accepted")
        call(lambda rr: 4, 6)          # the group is still usable afterwards: nothing half-sent

    # Statistics: cumulative == host recount of pairs routed to this rank's experts, over all calls.
    recount = torch.zeros(El, dtype=torch.int32)
    last = torch.zeros(El, dtype=torch.int32)
    for idx in all_idx:
        loc = idx[(idx >= r * El) & (idx < (r + 1) * El)] - r * El
        last = torch.bincount(loc, minlength=El).to(torch.int32)
        recount += last
    assert torch.equal(m.cumulative_local_expert_recv_stats, recount), "cumulative stats"
    assert torch.equal(m.last_local_expert_recv_stats, last), "last-call stats"
    g = m.global_expert_counts(cumulative=True)
    full = torch.cat(all_idx)
    assert torch.equal(g, torch.bincount(full[full >= 0], minlength=cfg.num_experts)), "global gather"


def run_all(ctx):
    out = {}
    for name in SCENARIOS:
        try:
            _scenario(ctx, name)
            out[name] = None
        except AssertionError as e:
            out[name] = f"rank {ctx.rank}: {e}"
    return out


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    per_rank = parallel_launch(request.param, run_all, timeout=240)
    return request.param, per_rank


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(results, scenario):
    world, per_rank = results
    failures = [res[scenario] for res in per_rank if res[scenario] is not None]
    assert not failures, f"{world} ranks, {scenario}: " + "; ".join(failures)


def _raises(ctx):
    raise RuntimeError(f"boom on rank {ctx.rank}")


def _hangs(ctx):
    if ctx.rank == 0:
        import time
        time.sleep(60)


def test_launcher_reports_failures_and_timeouts():
    with pytest.raises(AssertionError, match="boom on rank"):
        parallel_launch(2, _raises, timeout=60)
    with pytest.raises(AssertionError, match="timeout"):
        parallel_launch(2, _hangs, timeout=8)
