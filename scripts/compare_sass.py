"""Compare the sm_90a machine code of the grouped GEMMs between two source trees, on the CPU.

When no GPU is available, this tells you whether a refactor changed what runs on one. Each tree's
kernels are compiled by the Triton installed here, at the configs its own tests use
(`tests/test_gemm.py`'s `l1_compile_args` / `l2_compile_args`). The PTX is then assembled with
Triton's bundled ptxas and disassembled with cuobjdump. Two trees whose SASS is identical, compiled
by the GPU machine's Triton version, run the same instructions there.

    git archive <tested commit> mega_moe_layer tests | tar -x -C /tmp/old
    python scripts/compare_sass.py /tmp/old .          # SAME / DIFF per kernel variant; exit 1 on DIFF

Needs no GPU. Each tree is compiled in a child process, because both trees define the same module
names.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

#: (kernel, weight, act, weight kind, act rebased (streamed), block_m, combine) of the compared
#: variants: the streamed FP8 mainloop at decode and prefill heights, the bf16 mainloop, FP8
#: block scales, the FP8 combine.
CASES = [("l1", "mxfp4", "fp8", "mxfp4", True, 16, "bf16"), ("l1", "mxfp4", "fp8", "mxfp4", True, 32, "bf16"),
         ("l1", "mxfp4", "fp8", "mxfp4", True, 128, "bf16"), ("l2", "mxfp4", "fp8", "mxfp4", True, 16, "bf16"),
         ("l2", "mxfp4", "fp8", "mxfp4", True, 128, "bf16"), ("l1", "fp8", "fp8", "fp8_rebased", True, 128, "bf16"),
         ("l2", "fp8", "fp8", "fp8_rebased", True, 128, "bf16"), ("l1", "mxfp4", "fp8", "raw", False, 16, "bf16"),
         ("l2", "bf16", "bf16", "raw", False, 64, "bf16"), ("l1", "fp8", "fp4", "fp8_block", True, 16, "bf16"),
         ("l2", "mxfp4", "fp8", "mxfp4", True, 16, "fp8")]

_CHILD = r"""
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
root, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [os.path.join(root, "tests"), root]
import triton
from test_gemm import l1_compile_args, l2_compile_args
from mega_moe_layer.kernels import _compile
from mega_moe_layer.kernels.l1_gemm import _l1_kernel
from mega_moe_layer.kernels.l2_gemm import _l2_kernel
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
out = {}
for k, w, a, kind, streamed, bm, comb in cases:
    if k == "l1":
        sig, ce, opts = l1_compile_args(w, a, 90, bm, w_kind=kind, act_rebased=streamed)
    else:
        sig, ce, opts = l2_compile_args(w, a, comb, 90, bm, w_kind=kind, act_rebased=streamed)
    ptx = _compile.compile_kernel(_l1_kernel if k == "l1" else _l2_kernel, sig, ce, 90, **opts).asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        subprocess.run([os.path.join(tools, "ptxas"), "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                        os.path.join(d, "k.o")], check=True)
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", os.path.join(d, "k.o")],
                              capture_output=True, text=True, check=True).stdout
    # instructions only: no addresses, encodings or line information
    out["/".join(map(str, (k, w, a, kind, streamed, bm, comb)))] = [
        line.split(";")[0].split("*/", 1)[1].strip() for line in sass.splitlines()
        if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
print(json.dumps(out))
"""


def sass_of(root: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(root), json.dumps(CASES)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compiling {root} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", help="a source tree (mega_moe_layer/ and tests/), e.g. a tested commit's git archive")
    p.add_argument("new", help="another tree, e.g. .")
    args = p.parse_args(argv)
    old, new = sass_of(args.old), sass_of(args.new)
    changed = 0
    for case in old:
        a, b = old[case], new.get(case)
        same = a == b
        changed += not same
        diff = "" if same or b is None else f" ({sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))} lines)"
        print(f"{'SAME' if same else 'DIFF'} {case}: {len(a)} instructions{diff}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
