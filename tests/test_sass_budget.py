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
