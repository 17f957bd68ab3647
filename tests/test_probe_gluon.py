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
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (mode, block_r, usage)
        waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", p)]
        if mode == "sync":
            assert waits and set(waits) == {0}, waits
        elif mode.startswith("ws"):
            # a TMA producer and mbarriers, no cp.async; the consumers' K loop as "delayed"
            assert "cp.async.bulk.tensor.2d.shared::" in p and "cp.async.ca" not in p
            assert "mbarrier.try_wait.parity" in p and "setmaxnreg" in p, (mode, block_r)
            assert waits == [1, 0], (mode, block_r, waits)
        else:
            # one wait in the K loop that leaves this step's MMA in flight, one after it
            assert waits == [1, 0], (mode, block_r, waits)
