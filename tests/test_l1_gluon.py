"""The warp-specialised Gluon L1 (`kernels/l1_gluon.py`) on the CPU: it builds for sm_90a with the
structure it exists for, and `l1_grouped_gemm` takes it only where it applies. What it computes
needs a GPU (`tests/test_gemm_gpu.py::test_gluon_l1_matches_triton`)."""
import re

import pytest

from mega_moe_layer.kernels import _compile, l1_gluon, l2_gluon
from utils import assert_gluon_mma, assert_resident_ctas, gluon_kernel_ptx

CASES = [(128, 16), (128, 0), (32, 0), (16, 0)]

pytestmark = pytest.mark.skipif(not l1_gluon.HAVE_GLUON, reason="this Triton has no Gluon Hopper ops")


@pytest.mark.parametrize("w_kind", ["mxfp4", "fp8_rebased"])
def test_l1_gluon_compiles_for_hopper(w_kind):
    """DeepSeek-V3's L1 (H 7168, I 2048), prefill tiles with and without rows past block_m and the
    clamp, decode tiles of 32 and 16 pairs: E4M3 wgmma of 64 x block_m (and 64 x 16 for the rows past), the weights from registers for 4-bit words
    (their decode's layout conversion is asserted trivial when the kernel compiles) and from shared
    memory for FP8 ones, TMA for the weight boxes, cp.async for the gathered token rows arriving on
    mbarriers, registers reallocated between the partitions, and (almost) no spills."""
    cases = [(128, over, clamp) for over in (16, 0) for clamp in (False, True)] + [(32, 0, False), (16, 0, True)]
    # (the Triton kernel's 4-bit decode tiles promote every 256 K, as this one must then)
    ptxs = gluon_kernel_ptx(l1_gluon, [((w_kind, 7168, 2048), dict(
        has_clamp=clamp, block_m=bm, over_m=over, promote_k=256 if (w_kind == "mxfp4" and bm <= 32) else 128))
        for bm, over, clamp in cases])
    for (bm, over, clamp), p in zip(cases, ptxs):
        what = (w_kind, bm, over, clamp)
        assert _compile.ptx_target(p) == "sm_90a"
        assert_gluon_mma(p, bm, over, w_kind == "mxfp4", what)
        assert "cp.async.bulk.tensor.2d.shared::" in p, what                  # the weight boxes
        assert re.search(r"cp\.async\.c[ag]\.shared", p) and "cp.async.mbarrier.arrive.noinc" in p, what
        assert "setmaxnreg" in p and "mbarrier.try_wait.parity" in p, what
        if w_kind == "mxfp4":
            assert p.count("prmt.b32") >= 16, what                          # the 4-bit decode
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        # ptxas (Triton 3.6 and 3.9): 4 bytes spilled with rows past block_m
        assert usage["spill_stores"] <= 8 and usage["spill_loads"] <= 8, (what, usage)


@pytest.mark.parametrize("w_kind", ["mxfp4", "fp8_rebased"])
def test_l1_gluon_pair_ordered_x_compiles_for_hopper(w_kind):
    """PAIR_X (`l1_grouped_gemm(x_pairs=)`): the token rows come by TMA, one box per tile and step
    (and one for the rows past block_m), from a single producer warp: no cp.async gather and no
    cp.async barrier arrivals left, the same MMAs, no spills."""
    cases = [16, 0]
    ptxs = gluon_kernel_ptx(l1_gluon, [((w_kind, 7168, 2048), dict(block_m=128, over_m=over, pair_x=True))
                                       for over in cases])
    for over, p in zip(cases, ptxs):
        what = (w_kind, over)
        assert_gluon_mma(p, 128, over, w_kind == "mxfp4", what)
        # the weight's gate and up boxes, the token box, the rows past block_m's box
        assert p.count("cp.async.bulk.tensor.2d.shared::") == 3 + (over > 0), what
        assert not re.search(r"cp\.async\.c[ag]\.shared", p) and "cp.async.mbarrier.arrive" not in p, what
        assert "setmaxnreg" in p and "mbarrier.try_wait.parity" in p, what
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (what, usage)


def test_l1_gluon_profile_build_compiles_for_hopper():
    """The measuring build (`PROFILE`: PROF) reads the cycle counter and stores its counts (gathered
    and pair-ordered token rows); the build the layer runs reads no counter."""
    plain, gathered, pairs = gluon_kernel_ptx(l1_gluon, [
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, prof=True)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, pair_x=True, prof=True))])
    assert "%clock64" not in plain
    for what, p in (("gathered", gathered), ("pairs", pairs)):
        assert_gluon_mma(p, 128, 16, True, what)
        # per K step: the stage waits and the MMA wait timed (and the producer's free-stage wait)
        assert p.count("%clock64") >= 8, what
        assert re.search(r"st\.global(\.\w+)*\.b64", p), what


def test_l1_gluon_decode_ahead_compiles_for_hopper():
    """`DECODE_AHEAD`'s build (4-bit words, 128 + 16 rows; token rows gathered or in pair order):
    between one MMA's commit and its wait sit the next step's stage waits and its words' table
    lookups (PRMT), which the plain loop has none of there; no register of an unfinished MMA is
    touched (`_compile.wgmma_register_hazards`: the odd step's operand is decoded while the even
    step's MMA reads the even one); the same MMAs; (almost) no spills. At the 16-row decode tiles
    (256 K a partial sum) the pair's MMAs are chained: fewer MMA waits than the plain build."""
    plain, gathered, pairs, plain16, chained16 = gluon_kernel_ptx(l1_gluon, [
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, decode_ahead=True)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, decode_ahead=True, pair_x=True)),
        (("mxfp4", 7168, 2048), dict(block_m=16, over_m=0, promote_k=256)),
        (("mxfp4", 7168, 2048), dict(block_m=16, over_m=0, promote_k=256, decode_ahead=True))])
    # the 16-row decode tiles (promoted every 256 K): the pair's MMAs chained, one wait per pair
    assert _compile.wgmma_register_hazards(chained16) == []
    assert chained16.count("wgmma.wait_group") < plain16.count("wgmma.wait_group")
    assert_gluon_mma(chained16, 16, 0, True, "chained16")

    def under_mma(p):
        segs = re.findall(r"wgmma\.commit_group.*?wgmma\.wait_group", p, re.S)
        return max(min(s.count("mbarrier.try_wait"), s.count("prmt.b32") // 16) for s in segs)
    assert under_mma(plain) == 0
    for what, p in (("gathered", gathered), ("pairs", pairs)):
        assert_gluon_mma(p, 128, 16, True, what)
        assert under_mma(p) >= 1, what
        assert _compile.wgmma_register_hazards(p) == [], (what, _compile.wgmma_register_hazards(p)[:3])
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        # ptxas (Triton 3.6): 8 bytes spilled gathering, none in pair order
        assert usage["spill_stores"] <= 16 and usage["spill_loads"] <= 16, (what, usage)


def test_l1_gluon_lane_and_one_gather_warp_compile_for_hopper():
    """The lane K order (`LANE`: words 4 c + g of group c) at the prefill and decode tiles, decoding
    ahead too, and one gathering warp at the decode tiles (`GATHER_WARPS`, `DECODE_GATHER_WARPS`):
    the same MMAs, no register of an unfinished MMA touched, (almost) no spills; one warp's x barrier
    counts 32 arrivals (its cp.async arrivals), not 128."""
    kw = [dict(block_m=128, over_m=16, lane=True), dict(block_m=128, over_m=16, lane=True, decode_ahead=True),
          dict(block_m=16, over_m=0, promote_k=256, lane=True),
          dict(block_m=16, over_m=0, promote_k=256, gather=1), dict(block_m=32, over_m=0, promote_k=256, gather=1,
                                                                     lane=True)]
    ptxs = gluon_kernel_ptx(l1_gluon, [(("mxfp4", 7168, 2048), k) for k in kw])
    fp8 = gluon_kernel_ptx(l1_gluon, [(("fp8_rebased", 7168, 2048), dict(block_m=16, over_m=0, gather=1))])[0]
    for k, p in zip(kw + [dict(block_m=16, over_m=0, gather=1)], ptxs + [fp8]):
        assert_gluon_mma(p, k["block_m"], k["over_m"], p is not fp8, k)
        inits = re.findall(r"mbarrier\.init\.shared(?:::cta)?\.b64 \[[^\]]+\], (\d+);", p)
        assert ("32" in inits) == (k.get("gather") == 1) and ("128" in inits) == (k.get("gather") != 1), (k, inits)
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] <= 16 and usage["spill_loads"] <= 16, (k, usage)
    with pytest.raises(ValueError, match="gather"):
        l1_gluon.compile_args("mxfp4", 7168, 2048, block_m=128, over_m=16, gather=1)


def test_l1_gluon_gather_warps(monkeypatch):
    """`DECODE_GATHER_WARPS` (default 4) applies at the 16- and 32-row tiles only."""
    assert l1_gluon.DECODE_GATHER_WARPS == 4 and l1_gluon.gather_warps(16) == 4
    monkeypatch.setattr(l1_gluon, "DECODE_GATHER_WARPS", 1)
    assert [l1_gluon.gather_warps(bm) for bm in (16, 32, 128)] == [1, 1, 4]
    monkeypatch.setattr(l1_gluon, "DECODE_GATHER_WARPS", 2)
    with pytest.raises(ValueError, match="DECODE_GATHER_WARPS"):
        l1_gluon.gather_warps(16)


def test_l1_gluon_decode_ahead_applies(monkeypatch):
    """`DECODE_AHEAD` is taken only where it applies: 4-bit words promoted every 128 or 256 K over an
    even number of 128-K steps; on by default (measured faster, the same sums)."""
    assert l1_gluon.DECODE_AHEAD and l2_gluon.DECODE_AHEAD
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", False)
    assert not l1_gluon.ahead("mxfp4", 128, 7168)
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", True)
    assert l1_gluon.ahead("mxfp4", 128, 7168)
    assert not l1_gluon.ahead("fp8_rebased", 128, 7168)
    assert l1_gluon.ahead("mxfp4", 256, 7168)
    assert not l1_gluon.ahead("mxfp4", 512, 7168)
    assert not l1_gluon.ahead("mxfp4", 128, 7168 - 128)
    with pytest.raises(ValueError, match="decode_ahead"):
        l1_gluon.compile_args("fp8_rebased", 7168, 2048, block_m=16, over_m=0, decode_ahead=True)


def test_l1_gluon_prefill_256k_promotion(monkeypatch):
    """`PREFILL_PROMOTE_K` 256 (with `DECODE_AHEAD`): the 128-row 4-bit launches chain each pair of
    steps' MMAs (rows past block_m too) with one wait per pair, no register of an unfinished MMA
    touched; taken only there (`launch_promote_k`); the plain loop refuses 256 K with rows past
    block_m at compile time (it has no such path)."""
    ahead128, ahead256 = gluon_kernel_ptx(l1_gluon, [
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, decode_ahead=True)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, promote_k=256, decode_ahead=True))])
    assert_gluon_mma(ahead256, 128, 16, True, "256")
    assert _compile.wgmma_register_hazards(ahead256) == []
    assert ahead256.count("wgmma.wait_group") < ahead128.count("wgmma.wait_group")
    with pytest.raises(Exception, match="needs AHEAD"):
        gluon_kernel_ptx(l1_gluon, [(("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, promote_k=256))])
    assert l1_gluon.PREFILL_PROMOTE_K == 128
    monkeypatch.setattr(l1_gluon, "PREFILL_PROMOTE_K", 256)
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", False)
    assert l1_gluon.launch_promote_k("mxfp4", 128, 128, 7168) == 128          # not without DECODE_AHEAD
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", True)
    assert l1_gluon.launch_promote_k("mxfp4", 128, 128, 7168) == 256
    assert l1_gluon.launch_promote_k("fp8_rebased", 128, 128, 7168) == 128
    assert l1_gluon.launch_promote_k("mxfp4", 16, 256, 7168) == 256            # the decode tiles' own
    assert l1_gluon.launch_promote_k("mxfp4", 32, 128, 7168) == 128


def test_profile_split():
    """`profile_split` sums the CTAs' counters and shares the MMA warpgroup's cycles."""
    import torch
    prof = torch.zeros(4, 8, dtype=torch.int64)
    prof[0, :7] = torch.tensor([100, 10, 20, 30, 3, 100, 5])
    prof[1, :7] = torch.tensor([300, 30, 60, 90, 5, 300, 15])
    s = l1_gluon.profile_split(prof.view(-1))
    assert s["ctas"] == 2 and s["items"] == 8 and s["mma_all"] == 400
    assert s["mma_stage_wait_share"] == pytest.approx(0.1) and s["mma_mma_wait_share"] == pytest.approx(0.2)
    assert s["mma_epilogue_share"] == pytest.approx(0.3) and s["mma_rest_share"] == pytest.approx(0.4)
    assert s["load_empty_wait_share"] == pytest.approx(0.05)


def test_l1_gluon_pair_ordered_x_only_at_prefill_tiles():
    """The pair-ordered boxes are BM rows of one expert's consecutive pairs: the 128-row tiles
    only (the decode tiles gather)."""
    import torch

    x = torch.zeros(64, 256, dtype=torch.int8)
    w = torch.zeros(2, 64, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="x_pairs: the pair-ordered token rows are for the 128-row tiles"):
        l1_gluon.l1_gluon_launch(x, x, x, x, x, x, x, x, "mxfp4", w, None, x, x, x, hidden=256, inter=32,
                                 clamp=None, block_m=16, over_m=0, over_limit=0, group_m=8, num_sms=4, max_tiles=4,
                                 x_pairs=x.view(torch.float8_e4m3fn))


def test_l1_gluon_applies():
    """Only the streamed FP8 mainloop on sm_90 with FP8 h: tiles of 128, 32 or 16 pairs, 0 or 16 rows
    past block_m at prefill (none at decode), 4-bit tables of the "imad" kind, promotion every 128 K
    or every 256 K (not with rows past block_m)."""
    ok = dict(w_kind="mxfp4", act_format="fp8", streamed=True, block_m=128, over_m=16, fp4_table="imad", arch=90)
    assert l1_gluon.applies(**ok)
    assert l1_gluon.applies(**{**ok, "w_kind": "fp8_rebased", "over_m": 0})
    assert l1_gluon.applies(**{**ok, "block_m": 16, "over_m": 0})
    assert l1_gluon.applies(**{**ok, "block_m": 16, "over_m": 0, "promote_k": 256})
    for change in (dict(w_kind="fp8_block"), dict(act_format="fp4"), dict(streamed=False), dict(block_m=64),
                   dict(block_m=16), dict(over_m=32), dict(fp4_table="f16"), dict(arch=100), dict(promote_k=256),
                   dict(promote_k=512)):
        assert not l1_gluon.applies(**{**ok, **change}), change


def test_l1_gluon_resident_ctas():
    """Its shared memory (stages, the gate / up exchange buffer, barriers) leaves room for the CTAs
    per SM its launch plan counts on (`launch_plan`: two at prefill, four at decode), at every tile
    height and weight kind."""
    assert_resident_ctas("mega_moe_layer.kernels.l1_gluon",
                         [(k, bm, over) for k in ("mxfp4", "fp8_rebased") for bm, over in CASES])


def test_l1_gluon_weight_descriptor_needs_contiguous_weights():
    """The TMA descriptor addresses the weight tensor itself: a non-contiguous one (whose reshape
    would be a temporary copy) is refused with an error naming it."""
    import torch

    w = torch.zeros(2, 128, 256, dtype=torch.int8)
    assert list(l1_gluon.weight_descriptor("mxfp4", w, 512).shape) == [256, 64]      # [E 2I, H / 8] int32
    with pytest.raises(ValueError, match="w_data: expected the contiguous"):
        l1_gluon.weight_descriptor("mxfp4", w.transpose(1, 2).contiguous().transpose(1, 2), 512)


def test_gluon_defaults_are_the_measured_launches(monkeypatch):
    """By default (`ENABLED` None) each Gluon kernel is taken only at the launches (weight kind,
    tile height) where it ran faster than the Triton kernel on the GPU (docs/PERF.md, tenth and
    eleventh sessions): L1 with 4-bit weights at the 128-row prefill tiles, L2 with 4-bit weights
    at the 16-row decode tiles, both with FP8 weights at the 16-row decode tiles; ENABLED True /
    False force it on / off everywhere (`scripts/bench.py --gluon-l1 on|off`)."""
    assert l1_gluon.ENABLED is None and l2_gluon.ENABLED is None
    launches = [(k, bm) for k in ("mxfp4", "fp8_rebased") for bm in (16, 32, 64, 128)]
    assert [kb for kb in launches if l1_gluon.wanted(*kb)] == [("mxfp4", 128), ("fp8_rebased", 16)]
    assert [kb for kb in launches if l2_gluon.wanted(*kb)] == [("mxfp4", 16), ("fp8_rebased", 16)]
    for mod in (l1_gluon, l2_gluon):
        for forced in (True, False):
            monkeypatch.setattr(mod, "ENABLED", forced)
            assert [mod.wanted(*kb) for kb in launches] == [forced] * len(launches)


def test_gluon_kernels_wait_for_the_previous_kernel_under_pdl():
    """The layer launches kernels 2-8 with programmatic dependent launch (`Launcher.enable_pdl`
    binds PDL=True on every kernel that takes it, the Gluon ones included): each Gluon kernel must
    then wait for its predecessor (`griddepcontrol.wait`) before its first read of global memory,
    or it could read x / h before they are written."""
    from mega_moe_layer.kernels import l2_gluon

    for mod, kw in ((l1_gluon, dict(promote_k=128)), (l2_gluon, dict(promote_k=128))):
        ptx, = gluon_kernel_ptx(mod, [(("mxfp4", 7168, 2048), dict(kw, pdl=True))])
        body = ptx[ptx.index(".entry"):]
        wait = body.find("griddepcontrol.wait")
        reads = [i for i in (body.find("ld.global"), body.find("cp.async"), body.find("cp.async.bulk.tensor"))
                 if i >= 0]
        assert 0 <= wait < min(reads), (mod.__name__, wait, reads)
        assert "griddepcontrol.launch_dependents" in body
        # without PDL the instructions are absent (they are no-ops in a plain launch, but the
        # kernel as compiled for the tests' other checks has no PDL)
        plain, = gluon_kernel_ptx(mod, [(("mxfp4", 7168, 2048), kw)])
        assert "griddepcontrol" not in plain


@pytest.mark.parametrize("version, ok", [("3.6.0", True), ("3.9.1", True), ("4.0.0", True), ("3.5.1", False),
                                         ("3.2.0", False), ("3.10.0+git1234", True)])
def test_gluon_kernels_need_triton_3_6(monkeypatch, version, ok):
    """The Gluon kernels are taken by default, and Gluon's API changed between releases: they are
    used only from Triton 3.6 on (the releases they were built and checked with), so an older
    Triton that the package allows (>= 3.2) keeps the Triton kernels instead of failing to compile."""
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert l1_gluon._triton_at_least(3, 6) is ok


def test_launch_extras(monkeypatch):
    """The Gluon launches' extra constexprs: none for the plain build; the profile tensor checked
    against the grid (a clear error naming the switch); LANE; EPI_CVT with `EPILOGUE_HW_CVT`."""
    import torch

    from mega_moe_layer.kernels import l1_gemm
    cpu = torch.device("cpu")
    monkeypatch.setattr(l1_gemm, "EPILOGUE_HW_CVT", False)
    assert l1_gluon.launch_extras("l1_gluon.PROFILE", None, (4,), cpu, False) == {}
    prof = torch.zeros(32, dtype=torch.int64)
    assert l1_gluon.launch_extras("l1_gluon.PROFILE", prof, (4,), cpu, True) == dict(prof_ptr=prof, PROF=True,
                                                                                      LANE=True)
    with pytest.raises(ValueError, match=r"l2_gluon.PROFILE: expected an int64 tensor of >= 40"):
        l1_gluon.launch_extras("l2_gluon.PROFILE", prof, (5,), cpu, False)
    monkeypatch.setattr(l1_gemm, "EPILOGUE_HW_CVT", True)
    assert l1_gluon.launch_extras("l1_gluon.PROFILE", None, (4,), cpu, False) == dict(EPI_CVT=True)
