"""The warp-specialised Gluon L2 (`kernels/l2_gluon.py`) on the CPU: it builds for sm_90a with the
structure it exists for, the CTAs per SM it plans for fit, and `l2_grouped_gemm` takes it only
where it applies. What it computes needs a GPU (`tests/test_gemm_gpu.py -k gluon_l2`)."""
import re

import pytest

from mega_moe_layer.kernels import _compile, l1_gluon, l2_gluon
from utils import assert_gluon_mma, assert_resident_ctas, gluon_kernel_ptx

pytestmark = pytest.mark.skipif(not l1_gluon.HAVE_GLUON, reason="this Triton has no Gluon Hopper ops")

CASES = [(128, 16), (128, 0), (32, 0), (16, 0)]


@pytest.mark.parametrize("w_kind", ["mxfp4", "fp8_rebased"])
def test_l2_gluon_compiles_for_hopper(w_kind):
    """DeepSeek-V3's L2 (H 7168, I 2048) at every tile height: E4M3 wgmma of 64 x block_m (and 64 x
    16 for the rows past block_m), the weights from registers for 4-bit words and from shared memory
    for FP8 ones, TMA for weights and h (no cp.async: h is pair-ordered), the chained MMA left in
    flight across K steps for FP8 weights (`wgmma.wait_group 1` in the loop) and each step's MMA
    waited for with 4-bit ones (promoted as the Triton kernel; the next decode rewrites the register
    operand), 16-byte stores of y, no spills."""
    # summed as the Triton L2 sums (`test_gluon_kernels_cover_the_layers_launches`): 4-bit weights
    # promoted every 256 K at the decode heights and every 128 K at prefill, FP8 weights chained
    ptxs = gluon_kernel_ptx(l2_gluon, [((w_kind, 7168, 2048), dict(
        block_m=bm, over_m=over, promote_k=(256 if bm <= 32 else 128) if w_kind == "mxfp4" else 2048))
        for bm, over in CASES])
    for (bm, over), p in zip(CASES, ptxs):
        what = (w_kind, bm, over)
        assert_gluon_mma(p, bm, over, w_kind == "mxfp4", what)
        assert "cp.async.bulk.tensor.2d.shared::" in p and not re.search(r"cp\.async\.c[ag]\.shared", p), what
        waits = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", p)}
        if w_kind == "mxfp4":       # each step's MMA done before the next decode rewrites its registers
            assert waits == {0}, (what, waits)
        else:                       # the chain stays in flight
            assert 1 in waits or 2 in waits, (what, waits)
        assert "st.global.v4.b32" in p, what                           # y rows as 16-byte vectors
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (what, usage)


def test_l2_gluon_profile_build_compiles_for_hopper():
    """The measuring build (`PROFILE`: PROF, 4-bit promoted and FP8 chained) reads the cycle
    counter and stores its counts; the build the layer runs reads no counter."""
    plain, promoted, chained = gluon_kernel_ptx(l2_gluon, [
        (("mxfp4", 7168, 2048), dict(block_m=16, over_m=0, promote_k=128)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, promote_k=128, prof=True)),
        (("fp8_rebased", 7168, 2048), dict(block_m=16, over_m=0, prof=True))])
    assert "%clock64" not in plain
    for what, p, over in (("promoted", promoted, 16), ("chained", chained, 0)):
        assert_gluon_mma(p, 128 if over else 16, over, what == "promoted", what)
        assert p.count("%clock64") >= 8, what
        assert re.search(r"st\.global(\.\w+)*\.b64", p), what


def test_l2_gluon_decode_ahead_compiles_for_hopper():
    """`DECODE_AHEAD`'s L2 build (4-bit words): at 128 + 16 rows (promoted every 128 K) the next
    step's stage waits and table lookups sit between one MMA's commit and its wait; at 16 rows
    (256 K a partial sum) the pair's MMAs are chained, fewer MMA waits than the plain build; no
    register of an unfinished MMA touched, no spills."""
    plain, ahead, plain16, ahead16 = gluon_kernel_ptx(l2_gluon, [
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, promote_k=128)),
        (("mxfp4", 7168, 2048), dict(block_m=128, over_m=16, promote_k=128, decode_ahead=True)),
        (("mxfp4", 7168, 2048), dict(block_m=16, over_m=0, promote_k=256)),
        (("mxfp4", 7168, 2048), dict(block_m=16, over_m=0, promote_k=256, decode_ahead=True))])

    def under_mma(p):
        segs = re.findall(r"wgmma\.commit_group.*?wgmma\.wait_group", p, re.S)
        return max(min(s.count("mbarrier.try_wait"), s.count("prmt.b32") // 16) for s in segs)
    assert under_mma(plain) == 0 and under_mma(ahead) >= 1
    assert ahead16.count("wgmma.wait_group") < plain16.count("wgmma.wait_group")
    for what, p, bm, over in (("128", ahead, 128, 16), ("16", ahead16, 16, 0)):
        assert_gluon_mma(p, bm, over, True, what)
        assert _compile.wgmma_register_hazards(p) == [], what
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (what, usage)
    with pytest.raises(ValueError, match="decode_ahead"):
        l2_gluon.compile_args("fp8_rebased", 7168, 2048, block_m=16, over_m=0, decode_ahead=True)


def test_l2_gluon_lane_compiles_for_hopper():
    """w2's words in the "lane" K order (`LANE`) at the builds the layer launches (128 + 16 rows
    promoted every 128 K, 16 rows every 256 K; decoding ahead too): the same MMAs, no register of an
    unfinished MMA touched, no spills."""
    cases = [dict(block_m=128, over_m=16, promote_k=128), dict(block_m=16, over_m=0, promote_k=256),
             dict(block_m=16, over_m=0, promote_k=256, decode_ahead=True)]
    ptxs = gluon_kernel_ptx(l2_gluon, [(("mxfp4", 7168, 2048), dict(k, lane=True)) for k in cases])
    for k, p in zip(cases, ptxs):
        assert_gluon_mma(p, k["block_m"], k["over_m"], True, k)
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (k, usage)


def test_l2_gluon_resident_ctas():
    """Shared memory per CTA leaves room for the CTAs per SM of its plan (`l1_gluon.launch_plan`)."""
    assert_resident_ctas("mega_moe_layer.kernels.l2_gluon",
                         [(k, bm, over) for k in ("mxfp4", "fp8_rebased") for bm, over in CASES])


def test_l2_gluon_applies():
    """Only the streamed FP8 mainloop on sm_90 with FP8 h and the bf16 combine, summing K as the
    Triton kernel does: chained through all of K (FP8 weights only), or promoted every 128 K, or
    every 256 K without rows past block_m."""
    ok = dict(w_kind="mxfp4", act_format="fp8", combine_format="bf16", streamed=True, block_m=128, over_m=16,
              fp4_table="imad", arch=90, promote_k=128, inter=2048)
    assert l2_gluon.applies(**ok)
    assert l2_gluon.applies(**{**ok, "w_kind": "fp8_rebased", "promote_k": 2048})
    assert l2_gluon.applies(**{**ok, "w_kind": "fp8_rebased", "block_m": 16, "over_m": 0})
    assert l2_gluon.applies(**{**ok, "block_m": 16, "over_m": 0, "promote_k": 256})
    for change in (dict(combine_format="fp8"), dict(promote_k=256), dict(promote_k=512), dict(promote_k=2048),
                   dict(act_format="fp4"),
                   dict(streamed=False), dict(block_m=64), dict(block_m=16), dict(fp4_table="f16"), dict(arch=100),
                   dict(w_kind="fp8_block")):
        assert not l2_gluon.applies(**{**ok, **change}), change
    assert [l2_gluon.promote_steps(k, 2048) for k in (128, 256, 2048, 4096)] == [1, 2, 0, 0]


@pytest.mark.parametrize("w_kind", ["mxfp4", "fp8_rebased"])
def test_gluon_kernels_cover_the_layers_launches(w_kind):
    """At DeepSeek-V3's shape the configs `gemm_heuristics` gives the layer's L1 and L2 launches
    (the Gluon kernels' tile heights; 16 rows past the 128-row tiles) are ones both kernels take:
    the Triton L2 promotes every step on 4-bit weights and chains all of K on FP8 ones, and the
    Gluon kernels follow it either way."""
    from mega_moe_layer.kernels import gemm_heuristics as gh

    wf = "mxfp4" if w_kind == "mxfp4" else "fp8"
    for bm in l1_gluon.BLOCK_MS:
        over = gh.OVER_MS[0] if bm == 128 else 0
        c1 = gh.l1_gemm_config(bm, 7168, 2048, wf, "fp8", 90, fp8_mainloop=True, act_rebased=True, weight_kind=w_kind)
        c2 = gh.l2_gemm_config(bm, 7168, 2048, wf, "fp8", "bf16", 90, fp8_mainloop=True, act_rebased=True,
                               weight_kind=w_kind)
        assert l1_gluon.applies(w_kind, "fp8", True, bm, over, "imad", 90, c1.block_k * c1.promote_for(7168)), bm
        assert l2_gluon.applies(w_kind, "fp8", "bf16", True, bm, over, "imad", 90, c2.block_k * c2.promote_for(2048),
                                2048), bm
