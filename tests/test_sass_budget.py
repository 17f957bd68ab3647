"""`scripts/sass_budget.py` (instructions per loop iteration of the Gluon kernels' SASS) on the CPU."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import sass_budget  # noqa: E402

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   IMAD R2, R3, R4, R5 ;
.L_x_4:
        /*0020*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, R100, gdesc[UR16], RZ, !UPT ;
        /*0030*/                   FADD R6, R6, R7 ;
        /*0040*/               @P1 BRA `(.L_x_4) ;
        /*0050*/                   UTMALDG.2D [UR8], [UR28] ;
        /*0060*/              @!P0 BRA `(.L_x_3) ;
        /*0070*/                   EXIT ;
"""


def test_parse_and_innermost_loops():
    """Instructions with their opcodes and labels; only the innermost loop of a nest is kept, its
    count and the MACs of its QGMMAs reported."""
    insns = sass_budget.parse(_SASS)
    assert [i["op"] for i in insns] == ["MOV", "IMAD", "QGMMA", "FADD", "BRA", "UTMALDG", "BRA", "EXIT"]
    assert insns[1]["label"] == ".L_x_3" and insns[2]["label"] == ".L_x_4"
    found = sass_budget.loops(insns)
    assert len(found) == 1 and [i["op"] for i in found[0]["insns"]] == ["QGMMA", "FADD", "BRA"]
    d = sass_budget.describe(found[0])
    assert d["kind"] == "mma" and d["count"] == 3 and d["macs"] == 64 * 128 * 32


def test_keywords():
    assert sass_budget.keywords("block_m=128, over_m=16, pair_x=True") == dict(block_m=128, over_m=16, pair_x=True)


def test_default_l1_step(capsys):
    """The default Gluon L1 prefill build: its MMA loop issues one K step's MMAs (4 + 4 QGMMA,
    288 tensor cycles at the FP8 rate) and the report compares issue with them."""
    from mega_moe_layer.kernels import _compile, l1_gluon
    if not l1_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon Hopper ops")
    try:
        sass_budget.main([])
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    out = capsys.readouterr().out
    assert "mma loop:" in out and "QGMMA 8" in out and "= 288 tensor cycles" in out, out
    assert "load loop:" in out and "LDGSTS" in out and "issue slots against 576 tensor cycles" in out, out


def _mma_loop(sass: str) -> dict:
    found = [sass_budget.describe(lp) for lp in sass_budget.loops(sass_budget.parse(sass))]
    mma = [d for d in found if d["kind"] == "mma"]
    assert mma, "no MMA loop found"
    return max(mma, key=lambda d: d["count"])


@pytest.mark.parametrize("kernel,kw", [("l1", "block_m=16, over_m=0"), ("l1", "block_m=128, over_m=16"),
                                       ("l2", "block_m=16, over_m=0, promote_k=256"),
                                       ("l2", "block_m=128, over_m=16, promote_k=128")])
def test_lane_k_order_fewer_instructions_gluon(kernel, kw):
    """Words in the "lane" K order (`gemm_operands.LANE_K_ORDER`): the Gluon kernels' K-step loop
    builds one E2M1 table per row instead of one per word (Triton 3.6: L1 156 -> 141 at 16 rows,
    239 -> 222 at 128 + 16; L2 277 -> 243 per 256 K at 16 rows, 244 -> 227 at 128 + 16; the 4-bit
    builds the layer launches): the same MMAs, >= 12 fewer instructions, fewer IMAD (their PTX:
    `test_l1_gluon.py` / `test_l2_gluon.py`'s lane compile tests)."""
    from mega_moe_layer.kernels import _compile, l1_gluon
    if not l1_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon Hopper ops")
    args = ("mxfp4", 7168, 2048)
    try:
        col = _mma_loop(sass_budget.sass_of(kernel, args, sass_budget.keywords(kw)))
        lane = _mma_loop(sass_budget.sass_of(kernel, args, sass_budget.keywords(kw + ", lane=True")))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    assert lane["macs"] == col["macs"] and lane["ops"]["QGMMA"] == col["ops"]["QGMMA"]
    assert lane["count"] <= col["count"] - 12, (lane["count"], col["count"])
    assert lane["ops"]["IMAD"] < col["ops"]["IMAD"], (lane["ops"], col["ops"])


def test_lane_k_order_fewer_instructions_triton():
    """The Triton L1 / L2 (the 4-bit decode tiles' default kernels) with "imad_lane" tables: one
    IMAD pair per row and chunk; the row's offsets loaded as one int32 in the words' layout (loading
    its bytes at col // 4 made Triton shuffle them through shared memory: 700+ instructions). Triton
    3.6: 272 -> 242 per 256-K step at 16 rows."""
    from mega_moe_layer.kernels import _compile, l1_gemm, l2_gemm
    sys.path.insert(0, os.path.dirname(__file__))
    from test_gemm import l1_compile_args, l2_compile_args
    counts = {}
    try:
        for table in ("imad", "imad_lane"):
            for name, kern, args in (("l1", l1_gemm._l1_kernel, l1_compile_args("mxfp4", "fp8", 90, block_m=16,
                                                                               act_rebased=True, fp4_table=table)),
                                     ("l2", l2_gemm._l2_kernel, l2_compile_args("mxfp4", "fp8", "bf16", 90, block_m=16,
                                                                               act_rebased=True, fp4_table=table))):
                counts[name, table] = _mma_loop(sass_budget.sass_of_job(kern, *args))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    for name in ("l1", "l2"):
        col, lane = counts[name, "imad"], counts[name, "imad_lane"]
        assert lane["macs"] == col["macs"]
        assert lane["ops"].get("STS", 0) == 0, lane["ops"]          # no shuffle through shared memory
        assert lane["count"] <= col["count"] - 20, (name, lane["count"], col["count"])
    # the exact f16x2 tables (far groups) in lane order: one table per row and chunk too
    try:
        f16 = _mma_loop(sass_budget.sass_of_job(l1_gemm._l1_kernel, *l1_compile_args(
            "mxfp4", "fp8", 90, block_m=16, act_rebased=True, fp4_table="f16")))
        f16_lane = _mma_loop(sass_budget.sass_of_job(l1_gemm._l1_kernel, *l1_compile_args(
            "mxfp4", "fp8", 90, block_m=16, act_rebased=True, fp4_table="f16_lane")))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    assert f16_lane["ops"].get("STS", 0) == 0 and f16_lane["count"] < f16["count"] - 20, (f16_lane["count"], f16["count"])


def _item_loop(sass: str) -> int:
    """Instructions of the largest loop that issues MMAs (a persistent kernel's item loop, epilogues
    included)."""
    insns = sass_budget.parse(sass)
    where = {i["label"]: k for k, i in enumerate(insns) if i["label"]}
    best = 0
    for k, i in enumerate(insns):
        m = sass_budget._BRANCH.search(i["text"])
        if m and m.group(1) in where and where[m.group(1)] <= k:
            body = insns[where[m.group(1)]:k + 1]
            if any(x["op"] == "QGMMA" for x in body):
                best = max(best, len(body))
    return best


def test_epilogue_hw_cvt_fewer_instructions():
    """`l1_gemm.EPILOGUE_HW_CVT` (`EPI_CVT`): the epilogues round bf16 and E4M3 with the hardware's
    conversions (cvt.rn.bf16x2.f32, cvt.rn.satfinite.e4m3x2.f32 in the PTX) instead of the integer
    encoders: fewer instructions per item at the prefill tiles (Triton 3.6: the Gluon L1 3698 ->
    2302, the Triton L1 3399 -> 2598, the Triton L2 1008 -> 816), the K-step loop as it was (within
    register allocation), no register of an unfinished MMA touched."""
    from mega_moe_layer.kernels import _compile, l1_gemm, l1_gluon, l2_gemm
    sys.path.insert(0, os.path.dirname(__file__))
    from test_gemm import l1_compile_args, l2_compile_args
    builds = {}
    try:
        for cvt in (False, True):
            for name, kern, args in (
                    ("l1", l1_gemm._l1_kernel, l1_compile_args("mxfp4", "fp8", 90, block_m=128, act_rebased=True,
                                                               epi_cvt=cvt)),
                    ("l2", l2_gemm._l2_kernel, l2_compile_args("mxfp4", "fp8", "bf16", 90, block_m=128,
                                                               act_rebased=True, epi_cvt=cvt)),
                    ("l2 fp8 combine", l2_gemm._l2_kernel, l2_compile_args("mxfp4", "fp8", "fp8", 90, block_m=16,
                                                                           act_rebased=True, epi_cvt=cvt))):
                ptx, = _compile.compile_ptx_batch([_compile.CompileJob(kern, *args[:2], 90, **args[2])])
                builds[name, cvt] = (ptx, sass_budget.sass_of_job(kern, *args))
            if l1_gluon.HAVE_GLUON:
                job = l1_gluon.compile_args("mxfp4", 7168, 2048, block_m=128, over_m=16, epi_cvt=cvt)
                ptx, = _compile.compile_ptx_batch([_compile.CompileJob(job[0], job[1], job[2], 90, **job[3])])
                builds["gluon l1", cvt] = (ptx, sass_budget.sass_of_job(*job))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    for name in {n for n, _ in builds}:
        (ptx0, sass0), (ptx1, sass1) = builds[name, False], builds[name, True]
        assert "cvt.rn.bf16x2.f32" in ptx1 or "cvt.rn.bf16.f32" in ptx1, name
        if name != "l2":                                         # (L2 with the bf16 combine: no E4M3)
            assert "cvt.rn.satfinite.e4m3x2.f32" in ptx1 and "cvt.rn.satfinite.e4m3x2.f32" not in ptx0, name
        assert _compile.wgmma_register_hazards(ptx1) == [], name
        assert abs(_mma_loop(sass1)["count"] - _mma_loop(sass0)["count"]) <= 4, name    # (register allocation)
        assert _item_loop(sass1) <= _item_loop(sass0) - (100 if name != "l2 fp8 combine" else 20), \
            (name, _item_loop(sass1), _item_loop(sass0))
