"""Instructions per K step of the Gluon kernels' loops against the tensor pipe, on the CPU.

Compiles a Gluon L1 / L2 build (`kernels.l1_gluon.compile_args` / `l2_gluon.compile_args`) for
sm_90a with the Triton installed here, assembles it with Triton's bundled ptxas, disassembles it
with nvdisasm, and reports for each innermost loop that issues MMAs (QGMMA) or loads (UTMALDG /
LDGSTS) its instructions per iteration and their opcodes; then the issue slots per scheduler of
the MMA loop (and the producer's) against the tensor cycles of the MMAs it issues, at the H100's
dense FP8 rate (4096 MACs per clock per SM). docs/PERF.md (twelfth session) reads these figures.

    python scripts/sass_budget.py                                   # L1, MXFP4, 128 + 16 rows
    python scripts/sass_budget.py --kernel l1 --kw "block_m=128, over_m=16, decode_ahead=True"
    python scripts/sass_budget.py --kernel l2 --kw "block_m=16, over_m=0, promote_k=256"

Static: a loop's count holds both sides of its branches (e.g. the rows past block_m), and issue
slots are an upper bound on what a scheduler can do, not what it does.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: Dense FP8 MACs per clock per SM of an H100 / H200 (1979 TFLOP/s at 1.83 GHz on 132 SMs).
FP8_MACS_PER_CLOCK = 4096

_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_QGMMA = re.compile(r"QGMMA\.(\d+)x(\d+)x(\d+)")


def parse(sass: str) -> List[dict]:
    """nvdisasm text -> instructions in order: {"addr", "text", "op", "label"} (label: the
    `.L_x_N` defined just before it, if any)."""
    out, label = [], None
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            label = m.group(1)
            continue
        m = _INSN.match(line)
        if m:
            text = m.group(2)
            body = re.sub(r"^@!?U?P\w+\s+", "", text)
            out.append(dict(addr=int(m.group(1), 16), text=text, op=body.split()[0].split(".")[0], label=label))
            label = None
    return out


def loops(insns: List[dict]) -> List[dict]:
    """Innermost loops: a backward branch to a label, the instructions from the label to it
    (loops that contain another loop's back edge are dropped). Each: {"start", "end", "insns"}."""
    where = {i["label"]: k for k, i in enumerate(insns) if i["label"]}
    found = []
    for k, i in enumerate(insns):
        m = _BRANCH.search(i["text"])
        if m and m.group(1) in where and where[m.group(1)] <= k:
            found.append((where[m.group(1)], k))
    inner = [(a, b) for a, b in found if not any(a < c and d < b for c, d in found if (c, d) != (a, b))]
    return [dict(start=a, end=b, insns=insns[a:b + 1]) for a, b in inner]


def describe(loop: dict) -> Dict[str, object]:
    """A loop's instruction count, opcode histogram and the MACs of the QGMMAs it issues."""
    ops = Counter(i["op"] for i in loop["insns"])
    macs = 0
    for i in loop["insns"]:
        m = _QGMMA.search(i["text"])
        if m:
            macs += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return dict(count=len(loop["insns"]), ops=ops, macs=macs,
                kind="mma" if ops.get("QGMMA") else ("load" if ops.get("UTMALDG") or ops.get("LDGSTS") else "other"))


def sass_of(kernel: str, args: tuple, kw: dict) -> str:
    """The nvdisasm text of a Gluon build (`compile_args(*args, **kw)` of the kernel's module)."""
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    mod = l1_gluon if kernel == "l1" else l2_gluon
    return sass_of_job(*mod.compile_args(*args, **kw))


def sass_of_job(kernel_fn, sig: dict, ce: dict, opts: dict) -> str:
    """The nvdisasm text of any kernel's sm_90a build (`_compile.CompileJob` arguments: e.g. the
    Triton L1's from `tests/test_gemm.py`'s `l1_compile_args`)."""
    import triton

    from mega_moe_layer.kernels import _compile
    ptx, = _compile.compile_ptx_batch([_compile.CompileJob(kernel_fn, sig, ce, 90, **opts)])
    ptxas = _compile._ptxas_path(90)           # the ptxas this Triton assembles sm_90a with
    nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
    if not os.path.exists(nvdisasm):
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        subprocess.run([ptxas, "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.o")],
                       check=True)
        return subprocess.run([nvdisasm, "-c", os.path.join(d, "k.o")], capture_output=True, text=True,
                              check=True).stdout


def keywords(text: str) -> dict:
    """'block_m=128, over_m=16' -> {"block_m": 128, "over_m": 16} (literal values only)."""
    call = ast.parse(f"f({text})", mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", choices=("l1", "l2"), default="l1")
    p.add_argument("--args", default="('mxfp4', 7168, 2048)", help="compile_args' positional arguments (a tuple)")
    p.add_argument("--kw", default="block_m=128, over_m=16", help="compile_args' keywords, e.g. 'block_m=16, over_m=0'")
    p.add_argument("--ctas", type=int, default=0, help="CTAs per SM (default: the build's `launch_plan`)")
    p.add_argument("--producer-warps", type=int, default=0,
                   help="warps of the loading partition (default: 4 gathering, 1 with pair_x, gather=1 or for L2)")
    a = p.parse_args(argv)
    args = ast.literal_eval(a.args)
    kw = keywords(a.kw)
    from mega_moe_layer.kernels import l1_gluon
    ctas = a.ctas or l1_gluon.launch_plan(args[0], kw.get("block_m", 128), kw.get("over_m", 16))[2]
    pwarps = a.producer_warps or (4 if a.kernel == "l1" and not kw.get("pair_x") and kw.get("gather", 4) == 4 else 1)
    found = [describe(lp) for lp in loops(parse(sass_of(a.kernel, args, kw)))]
    print(f"{a.kernel} {args} {kw}: {ctas} CTAs per SM, {pwarps} producer warp(s)")
    for d in found:
        if d["kind"] == "other":
            continue
        top = ", ".join(f"{op} {n}" for op, n in d["ops"].most_common(10))
        macs = (f"; {d['macs'] / 1e6:.2f} M MACs = {d['macs'] / FP8_MACS_PER_CLOCK:.0f} tensor cycles"
                if d["macs"] else "")
        print(f"  {d['kind']} loop: {d['count']} instructions per iteration ({top}){macs}")
    mma = [d for d in found if d["kind"] == "mma"]
    load = [d for d in found if d["kind"] == "load"]
    if mma and load:
        # Each of the 4 schedulers runs one warp of each resident CTA's MMA warpgroup; a gathering
        # warpgroup puts one producer warp on every scheduler, a single producer warp sits on one:
        # the busiest scheduler issues both loops' instructions per CTA either way. (The loops'
        # iterations are K steps, two for a decode-ahead loop, whose MACs count both.)
        m = max(mma, key=lambda d: d["count"])
        ld = max(load, key=lambda d: d["count"])
        step_macs = 64 * (kw.get("block_m", 128) + kw.get("over_m", 16)) * 128     # one 128-K step's MMAs
        steps = max(1, round(m["macs"] / step_macs))
        issue = ctas * (m["count"] + ld["count"] * steps)
        tensor = ctas * m["macs"] / FP8_MACS_PER_CLOCK
        print(f"  the busiest scheduler, per {steps} K step(s) of each of {ctas} CTAs: {issue} issue slots against "
              f"{tensor:.0f} tensor cycles ({issue / max(tensor, 1):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
