#!/usr/bin/env python3
"""Print the markdown tables of docs/WORKSPACE.md: our workspace vs DeepEP's low-latency buffer.

    python scripts/workspace_sizes.py > /tmp/tables.md

Shape: DeepSeek-V3 (H 7168, I 2048, E 256, K 8), fp8 activations per 32, bf16 combine.
Sizes are per rank (the workspace is symmetric: every rank allocates the same bytes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from mega_moe_layer.comm.bootstrap import required_heap_bytes
from mega_moe_layer.comm.workspace import SLOT_ROLES, workspace_layout
from mega_moe_layer.config import MegaMoEConfig

TOKENS = (128, 1024, 4096, 8192)
RANKS = (2, 8)


def deepep_low_latency_bytes(tokens: int, hidden: int, num_experts: int) -> int:
    """DeepEP's low-latency RDMA buffer (`get_low_latency_rdma_size_hint`), re-derived.

    Two (odd/even) copies each of: a send buffer holding num_experts x tokens combine messages, a
    receive buffer holding num_experts x tokens messages of the larger of the dispatch and combine
    message, and a small signalling area. A dispatch message is a 16-byte header plus
    max(2 H, H + 4 H/128) bytes (bf16 row, or fp8 row + float scales per 128); a combine message is
    2 H + 4 H/128 bytes (bf16 row + per-128 bf16 min/max). The world size does not enter.
    """
    num_scales = hidden // 128
    dispatch_msg = 16 + max(2 * hidden, hidden + 4 * num_scales)
    combine_msg = 2 * hidden + 4 * num_scales
    send = max(tokens * dispatch_msg, num_experts * tokens * combine_msg)
    recv = num_experts * tokens * max(dispatch_msg, combine_msg)
    signalling = -(-(num_experts * 8) // 128) * 128
    return 2 * (send + recv + signalling)


def human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def v3(tokens: int) -> MegaMoEConfig:
    return MegaMoEConfig(hidden=7168, intermediate=2048, num_experts=256, topk=8,
                         max_tokens_per_rank=tokens, weight_format="mxfp4", act_format="fp8",
                         combine_format="bf16", act_group_size=32)


def size_table() -> str:
    lines = ["| tokens per rank | ranks | ours (bytes) | ours | NVSHMEM heap we request | "
             "DeepEP LL buffer | DeepEP / ours |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in TOKENS:
        deepep = deepep_low_latency_bytes(t, 7168, 256)
        for r in RANKS:
            ours = workspace_layout(v3(t), r).nbytes
            lines.append(f"| {t} | {r} | {ours:,} | {human(ours)} | "
                         f"{human(required_heap_bytes(ours))} | {human(deepep)} | "
                         f"{deepep / ours:.1f}x |")
    return "\n".join(lines)


def slot_table(tokens: int, ranks: int) -> str:
    layout = workspace_layout(v3(tokens), ranks)
    lines = [f"Slots at {tokens} tokens per rank, {ranks} ranks (total {layout.nbytes:,} bytes):", "",
             "| slot | dtype | shape | offset | bytes | written by | read by |",
             "|---|---|---|---:|---:|---|---|"]
    for s in layout:
        writer, reader = SLOT_ROLES[s.name]
        dtype = str(s.dtype).replace("torch.", "")
        lines.append(f"| {s.name} | {dtype} | {list(s.shape)} | {s.offset:,} | {s.nbytes:,} | "
                     f"{writer} | {reader} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", nargs=2, type=int, metavar=("TOKENS", "RANKS"), default=(128, 8),
                   help="also print the per-slot table for this shape (default 128 8)")
    args = p.parse_args()
    print(size_table())
    print()
    print(slot_table(*args.slots))


if __name__ == "__main__":
    main()
