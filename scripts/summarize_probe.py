"""One table of a `scripts/probe_call.sh` (or `ab_bench.sh`) output folder, for docs/PERF.md.

Reads the layer runs' JSON (`new.json`: the defaults, with DeepGEMM's anchor; `new2.json` ..
`new8.json`: the variants, their arguments in each file's argv) and prints, per T, each run's
graph median, its ratio to the defaults' at the same T, DeepGEMM's FP8 and FP8 x FP4 times and
issue 11's H200 target; then the kernel lines of `bench_gemm.py`'s logs (`bg_dec.log`, `bg.log`).

    python scripts/summarize_probe.py OUT_FOLDER

Times are the runs' CUDA-graph medians in us (eager where no graph was timed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

#: Issue 11's targets (one H200, dsv3, MXFP4, FP8 acts, bf16 combine, graph), us.
TARGETS_US = {1: 100.0, 128: 1800.0, 512: 2000.0, 4096: 4000.0}
RUNS = ("new", "new2", "new3", "new4", "new5", "new6", "new7", "new8")
KERNEL_LINE = re.compile(r"(Gluon|streamed fp8|cycle split|one gathering warp|pair order)")


def _median_us(row: dict) -> Optional[float]:
    t = row.get("ours_graph") or row.get("ours")
    return None if not t else 1e6 * t["median"]


def _variant(res: dict) -> str:
    """A run's switches: its argv without `ab_bench.sh`'s common arguments, tokens and paths."""
    argv, out, i = res.get("argv") or [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--preset", "--routing", "--iters", "--json", "--out", "--anchor"):
            i += 2
        elif a == "--tokens":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        elif a == "--no-baseline":
            i += 1
        else:
            out.append(a)
            i += 1
    return " ".join(out) or "defaults"


def load_runs(folder: str) -> List[dict]:
    """The runs found in `folder`, in RUNS order: {"name", "variant", "card", "by_T": {T: us},
    "anchor": {T: {kind: us}}}."""
    runs = []
    for name in RUNS:
        path = os.path.join(folder, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        by_t, anchor = {}, {}
        for row in res.get("rows", []):
            us = _median_us(row)
            if us is not None:
                by_t[row["tokens"]] = us
            for kind, entry in (row.get("anchor") or {}).items():
                if isinstance(entry, dict) and entry.get("time"):
                    anchor.setdefault(row["tokens"], {})[kind] = 1e6 * entry["time"]["median"]
        runs.append(dict(name=name, variant=_variant(res), card=res.get("card", "?"), by_T=by_t, anchor=anchor))
    return runs


def table(runs: List[dict]) -> str:
    """Markdown: one row per (T, run), the ratio to the first run ("new", the defaults) at that T."""
    if not runs:
        return "(no run JSON found)"
    base = runs[0]
    lines = [f"card: {base['card']}", "",
             "| T | run | switches | us | / defaults | DG FP8 us | DG FP8 x FP4 us | target (H200) us |",
             "|---|---|---|---|---|---|---|---|"]
    tokens = sorted({t for r in runs for t in r["by_T"]}, reverse=True)
    for t in tokens:
        dg: Dict[str, float] = base["anchor"].get(t, {})
        for r in runs:
            if t not in r["by_T"]:
                continue
            us = r["by_T"][t]
            rel = f"{us / base['by_T'][t]:.3f}" if t in base["by_T"] else "-"
            fp8 = f"{dg['fp8']:.1f}" if r is base and "fp8" in dg else ""
            fp4 = f"{dg['fp8xfp4']:.1f}" if r is base and "fp8xfp4" in dg else ""
            tgt = f"{TARGETS_US[t]:.0f}" if r is base and t in TARGETS_US else ""
            lines.append(f"| {t} | {r['name']} | {r['variant']} | {us:.1f} | {rel} | {fp8} | {fp4} | {tgt} |")
    return "\n".join(lines)


def kernel_lines(folder: str) -> List[str]:
    out = []
    for name in ("bg_dec.log", "bg.log"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                out += [f"[{name}] {line.rstrip()}" for line in f if KERNEL_LINE.search(line)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    a = p.parse_args(argv)
    print(table(load_runs(a.folder)))
    lines = kernel_lines(a.folder)
    if lines:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
