"""CPU checks of scripts/bench.py and scripts/deepgemm_anchor.py: argument parsing, the
single-process launch, ratios, the table, and the DeepGEMM anchor's plumbing against a stand-in
`deep_gemm` (the real one runs only on the GPU machine)."""
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench")
anchor = _load("deepgemm_anchor")


def test_parse_args_defaults_keep_the_baseline():
    a = bench.parse_args([])
    assert a.anchor == "none" and not a.no_baseline and a.graph and a.host_iters == 30
    assert a.json is None and not a.host_validate


def test_parse_args_the_gpu_command():
    a = bench.parse_args("--preset dsv3 --tokens 1 128 512 4096 --routing uniform --anchor deepgemm "
                         "--no-baseline --json out/bench.json --host-validate".split())
    assert a.tokens == [1, 128, 512, 4096] and a.routing == ["uniform"] and a.anchor == "deepgemm"
    assert a.no_baseline and a.json == "out/bench.json" and a.host_validate and a.anchor_graph


@pytest.mark.parametrize("argv", [["--host-iters", "10"], ["--anchor", "cutlass"], ["--routing", "zipf"],
                                  ["--tokens", "-1"]])
def test_parse_args_rejects(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_dist_init_args():
    assert bench.dist_init_args({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, {})
    local, kw = bench.dist_init_args({})        # plain `python scripts/bench.py`: one rank, GPU 0
    assert local == 0 and kw["rank"] == 0 and kw["world_size"] == 1
    assert kw["init_method"].format(port=1234) == "tcp://127.0.0.1:1234"


def test_ratio_and_rel_rmse():
    assert anchor.ratio(2.0, 4.0) == 0.5
    for num, den in [(None, 1.0), (1.0, None), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))]:
        assert anchor.ratio(num, den) is None
    ref = torch.tensor([[3.0, 4.0]])
    assert anchor.rel_rmse(ref, ref) == 0.0
    assert anchor.rel_rmse(torch.zeros(1, 2), ref) == pytest.approx(1.0)
    assert math.isnan(anchor.rel_rmse(torch.zeros(0, 2), torch.zeros(0, 2)))
    assert math.isnan(anchor.rel_rmse(ref, torch.zeros(1, 2)))


def _st(us):
    return dict(median=us * 1e-6, p10=us * 1e-6, p90=us * 1e-6)


def _row(T, graph=True, base=True, dg=True):
    r = dict(routing="uniform", tokens=T, ours=_st(1000.0), ours_graph=_st(250.0) if graph else None,
             baseline=_st(3000.0) if base else None, floor=50e-6, floors={}, limit="hbm", tflops=3.4,
             hbm_GBps=898.0, nvlink_GBps=0.0, speedup=12.0 if base else None, frac_floor=0.2,
             host=dict(validate_false=_st(800.0), validate_true=_st(900.0)),
             eager_over_graph=anchor.ratio(1000.0, 250.0) if graph else None)
    if dg:
        ours_t, which = bench.ours_best(r)
        r["anchor"] = dict(ours_time_used=which,
                           fp8=bench.anchor_entry(_st(200.0), "graph", 0.031, ours_t),
                           fp8xfp4=bench.anchor_entry(_st(500.0), "eager", float("nan"), ours_t))
    return r


def test_anchor_entry_uses_the_graph_time():
    r = _row(1)
    assert bench.ours_best(r) == (250e-6, "graph")
    assert r["anchor"]["fp8"]["ours_over_anchor"] == pytest.approx(1.25)
    assert r["anchor"]["fp8xfp4"]["ours_over_anchor"] == pytest.approx(0.5)
    assert r["anchor"]["fp8xfp4"]["rel_rmse_vs_ours"] is None     # nan -> None: strict JSON
    assert bench.ours_best(_row(1, graph=False, dg=False)) == (1000e-6, "eager")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_format_table_full():
    text = bench.format_table([_row(1), _row(128)], baseline=True, anchor=True, host_validate=True, nvlink=False)
    lines = text.splitlines()
    assert len(lines) == 4                              # header, rule, one row per (routing, T)
    hdr = _cells(lines[0])
    assert lines[1].count("|---") == len(hdr)
    row = dict(zip(hdr, _cells(lines[2])))
    assert len(_cells(lines[2])) == len(hdr) and len(_cells(lines[3])) == len(hdr)
    assert row["ours graph us"] == "250.0" and row["ours eager us"] == "1000.0"
    assert row["eager/graph"] == "4.00x" and row["host us"] == "800.0" and row["host us (validate)"] == "900.0"
    assert row["baseline us"] == "3000.0" and row["speed-up"] == "12.00x"
    assert row["DG fp8 us"] == "200.0" and row["ours/DG fp8"] == "1.25x"
    assert row["DG fp8xfp4 us"] == "500.0" and row["ours/DG fp8xfp4"] == "0.50x"
    assert row["DG timed as"] == "graph / eager" and row["rel-RMSE vs DG fp8 / fp8xfp4"] == "0.031 / -"
    assert "NVLink GB/s" not in hdr and row["floor us (limit)"] == "50.0 (hbm)"


def test_format_table_minimal_leaves_unmeasured_columns_out():
    text = bench.format_table([_row(1, graph=False, base=False, dg=False)])
    hdr, _, line = text.splitlines()
    hdr = _cells(hdr)
    assert not any(h.startswith(("DG", "baseline", "ours/DG")) for h in hdr) and "NVLink GB/s" in hdr
    row = dict(zip(hdr, _cells(line)))
    assert row["ours graph us"] == "-" and row["eager/graph"] == "-"


def test_import_deep_gemm_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_gemm", None)      # import raises ImportError
    with pytest.raises(anchor.AnchorUnavailable, match="import deep_gemm.*failed.*build.sh"):
        anchor.import_deep_gemm()
    monkeypatch.setitem(sys.modules, "deep_gemm", types.ModuleType("deep_gemm"))
    with pytest.raises(anchor.AnchorUnavailable, match="lacks get_symm_buffer_for_sm90_mega_moe"):
        anchor.import_deep_gemm()


class _FakeDG:
    """A stand-in for deep_gemm recording calls; its quantisers follow deep_gemm.utils' shapes."""

    def __init__(self):
        self.calls = []
        self.utils = types.SimpleNamespace(per_block_cast_to_fp8=self._fp8, per_token_cast_to_fp4=self._fp4)

    @staticmethod
    def _fp8(w, use_ue8m0, gran_k=128):
        assert not use_ue8m0 and gran_k == 128 and w.dim() == 2
        n, k = w.shape
        return w.float().to(torch.float8_e4m3fn), torch.full((n // 128, k // 128), 0.5)

    @staticmethod
    def _fp4(w, use_ue8m0, gran_k=128, use_packed_ue8m0=False):
        assert use_ue8m0 and gran_k == 32 and not use_packed_ue8m0
        n, k = w.shape
        return torch.ones(n, k // 2, dtype=torch.int8), torch.full((n, k // 32), 0.25)

    def get_symm_buffer_for_sm90_mega_moe(self, group, E, T, K, H, I):
        self.calls.append(("buffer", E, T, K, H, I))
        return types.SimpleNamespace(x="bx", x_sf="bsf", topk_idx="bidx", topk_weights="bw",
                                     destroy=lambda: self.calls.append(("destroy",)))

    def transform_weights_for_mega_moe_sm90(self, l1, l2):
        self.calls.append(("t8", l1[0].dtype, tuple(l1[1].shape)))
        return ("L1fp8", "L1fp8sf"), ("L2fp8", "L2fp8sf")

    def transform_weights_for_mega_moe_sm90_fp4(self, l1, l2):
        self.calls.append(("t4", l1[0].dtype, tuple(l1[1].shape)))
        return ("L1fp4", "L1fp4sf"), ("L2fp4", "L2fp4sf")

    def mega_moe_pre_dispatch_sm90(self, *a):
        self.calls.append(("pre", a[1].dtype, a[3:7], a[7:]))

    def fp8_mega_moe(self, y, l1, l2, buf, cumulative_local_expert_recv_stats=None, recipe=None):
        self.calls.append(("fp8", l1, l2, recipe))

    def fp8_fp4_mega_moe(self, y, l1, l2, buf, cumulative_local_expert_recv_stats=None, recipe=None):
        self.calls.append(("fp4", l1, l2, recipe))


def test_anchor_plumbing_with_a_stand_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cfg = types.SimpleNamespace(num_experts=8, topk=2, hidden=256, intermediate=128)
    w13 = torch.randn(4, 256, 256).bfloat16()
    w2 = torch.randn(4, 256, 128).bfloat16()
    dg = _FakeDG()
    a = anchor.DeepGEMMAnchor(dg, None, cfg, w13, w2, num_max_tokens_per_rank=64)
    assert dg.calls[0] == ("buffer", 8, 64, 2, 256, 128)
    assert dg.calls[1] == ("t8", torch.float8_e4m3fn, (4, 2, 2))     # [E, 2I/128, H/128]
    assert dg.calls[2] == ("t4", torch.int8, (4, 256, 8))            # [E, 2I, H/32]
    assert a.stats.dtype == torch.int32 and a.stats.shape == (4,)
    x = torch.randn(3, 256).bfloat16()
    idx = torch.tensor([[0, 5], [7, -1], [2, 3]])
    w = torch.rand(3, 2)
    y = torch.empty(3, 256, dtype=torch.bfloat16)
    for kind, name, l1, recipe in [("fp8", "fp8", ("L1fp8", "L1fp8sf"), (128, 128, 128)),
                                   ("fp8xfp4", "fp4", ("L1fp4", "L1fp4sf"), (1, 1, 32))]:
        dg.calls.clear()
        a.make_call(kind, x, idx, w, y)()
        pre, mega = dg.calls
        assert pre == ("pre", torch.int32, ("bx", "bsf", "bidx", "bw"), (3, 128, 1.0))
        assert mega == (name, l1, (l1[0].replace("L1", "L2"), l1[1].replace("L1", "L2")), recipe)
    a.destroy()
    assert dg.calls[-1] == ("destroy",)


def test_quantize_shapes_with_a_stand_in():
    dg = _FakeDG()
    w13, w2 = torch.randn(2, 256, 384).bfloat16(), torch.randn(2, 384, 128).bfloat16()
    (q1, s1), (q2, s2) = anchor.quantize_fp8(dg, w13, w2)
    assert q1.shape == (2, 256, 384) and q1.dtype == torch.float8_e4m3fn and s1.shape == (2, 2, 3)
    assert q2.shape == (2, 384, 128) and s2.shape == (2, 3, 1) and (s2 == 0.5).all()
    (p1, t1), (p2, t2) = anchor.quantize_fp4(dg, w13, w2)
    assert p1.shape == (2, 256, 192) and p1.dtype == torch.int8 and t1.shape == (2, 256, 12)
    assert p2.shape == (2, 384, 64) and t2.shape == (2, 384, 4) and (t2 == 0.25).all()
