"""The Gluon promotion probe (`scripts/probe_gluon_promote.py`) builds for sm_90a on the CPU: the
FP8 wgmma (m64n128k32, E4M3 x E4M3), no spills, and the wait that distinguishes the modes — the
synchronous promotion waits for every MMA (`wgmma.wait_group 0` only), the delayed one leaves the
current step's MMA in flight while it adds the previous step's partial sum (`wait_group 1` in the
K loop). What it measures needs a GPU (its own `main`)."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import probe_gluon_promote as pg  # noqa: E402

pytestmark = pytest.mark.skipif(not pg.HAVE_GLUON, reason="this Triton has no Gluon Hopper ops")


def test_probe_modes_compile_for_hopper():
    """Every mode, with one warpgroup per CTA (64 weight rows) and with two (128);
    "ws" is warp-specialised (a TMA producer warp, mbarriers, registers reallocated per partition)."""
    from mega_moe_layer.kernels import _compile

    reg_a = ("ws4r", "ws4g")                   # the weight operand decoded into registers
    cases = [(mode, block_r) for block_r in (64, 128) for mode in pg.MODES]
    jobs = []
    for mode, block_r in cases:
        kernel, sig, ce, opts = pg.compile_args(mode, block_r=block_r)
        jobs.append(_compile.CompileJob(kernel, sig, ce, 90, **opts))
    try:
        ptx = dict(zip(cases, _compile.compile_ptx_batch(jobs)))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    for (mode, block_r), p in ptx.items():
        assert _compile.ptx_target(p) == "sm_90a"
        mmas = set(re.findall(r"wgmma\.mma_async[\w.:]+", p))
        assert mmas == {"wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"}, (mode, block_r, mmas)
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        # ws4g: ptxas spills 4 (Triton 3.6) / 8 (3.9) bytes at the kernel's 128-register cap
        spill_ok = 8 if mode == "ws4g" else 0
        assert usage["spill_stores"] <= spill_ok and usage["spill_loads"] <= spill_ok, (mode, block_r, usage)
        waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", p)]
        if mode == "sync":
            assert waits and set(waits) == {0}, waits
        elif mode.startswith("ws"):
            # a TMA producer and mbarriers; the consumers' K loop as "delayed"; ws4g gathers the
            # token rows with cp.async arriving on mbarriers, the others use TMA only
            assert "cp.async.bulk.tensor.2d.shared::" in p
            gathers = "cp.async.mbarrier.arrive.noinc" in p and re.search(r"cp\.async\.c[ag]\.shared", p)
            assert bool(gathers) == (mode == "ws4g"), (mode, block_r)
            assert "mbarrier.try_wait.parity" in p and "setmaxnreg" in p, (mode, block_r)
            assert waits == [1, 0], (mode, block_r, waits)
            # ws4r / ws4g feed the MMA's weight operand from registers (the decoded words, no shared
            # round trip: its layout conversion is asserted trivial when it compiles); the others
            # from a shared-memory descriptor
            a_operand = re.search(r"wgmma\.mma_async[\w.:]+\s*\{[^}]*\},\s*(\S+)", p).group(1)
            assert a_operand.startswith("{") == (mode in reg_a), (mode, block_r, a_operand)
        else:
            # one wait in the K loop that leaves this step's MMA in flight, one after it
            assert waits == [1, 0], (mode, block_r, waits)


def test_probe_word_packing_matches_the_layer():
    """The probe's 4-bit words are the layer's: fragment order is `gemm_operands.fragment_words`
    bit for bit (what ws4r decodes), and the natural-order words decode (`fp4_words_reference`, the
    FP8 modes' weights) to E2M1(code) x 2**(6 - d) at every k."""
    import torch
    from mega_moe_layer.kernels import gemm_operands, reference as ref

    g = torch.Generator().manual_seed(3)
    R, K = 8, 256
    codes = torch.randint(0, 16, (R, K), generator=g, dtype=torch.int64)
    frag = gemm_operands.fragment_words(ref.pack_fp4(codes.to(torch.uint8))).view(torch.int32)
    assert torch.equal(pg.pack_fp4_words(codes, fragment=True), frag)
    d = torch.randint(0, 12, (R, K // 32), generator=g, dtype=torch.int64).to(torch.uint8)
    w = pg.fp4_words_reference(pg.pack_fp4_words(codes, fragment=False), d).float()
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    want = e2m1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0) * 2.0 ** (6 - d.float().repeat_interleave(32, 1))
    assert torch.equal(w, want)
