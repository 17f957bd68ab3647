"""Expert-load statistics: per call, cumulative, a global gather, dumps and their readers.

`ExpertLoadStats` lives on each `MegaMoEExperts`; `dump_stats` writes the counts of many layers
to a JSON file, and `python -m mega_moe_layer.stats DUMP [--png OUT.png]` prints a per-expert table
(min / mean / max, imbalance = max / mean) and optionally draws a layer x expert heat map.
Dumps are JSON: reading one never runs code.
"""
from __future__ import annotations

import argparse
import json
import struct
import zlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["ExpertLoadStats", "dump_stats", "load_stats", "format_table", "write_heatmap_png", "write_png",
           "main"]

DUMP_FORMAT = "mega_moe_layer.expert_load.v1"


class ExpertLoadStats:
    """Counts of (token, slot) pairs received by each local expert.

    cumulative: int32 [E_local], never reset (`cumulative_local_expert_recv_stats`).
    last: int32 [E_local], the last call's counts (the shape SGLang's expert-distribution recorder
    consumes per layer).
    """

    def __init__(self, num_local_experts: int, device=None):
        self.num_local_experts = num_local_experts
        self.cumulative = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
        self.last = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
        self.num_calls = 0

    def record(self, counts: torch.Tensor) -> None:
        """Add one call's int32 [E_local] counts (in place: buffers keep their addresses)."""
        self.last.copy_(counts)
        self.cumulative += counts
        self.num_calls += 1

    def gather_global(self, group, num_ranks: int, cumulative: bool = False) -> torch.Tensor:
        """int64 [E] = every rank's local counts, rank-major (collective over `group`)."""
        local = (self.cumulative if cumulative else self.last).to(torch.int64)
        if group is None or num_ranks == 1:
            return local.clone()
        out = [torch.empty_like(local) for _ in range(num_ranks)]
        dist.all_gather(out, local, group=group)
        return torch.cat(out)


def dump_stats(path: str, layers: Dict[str, Sequence[int]], meta: Optional[dict] = None) -> None:
    """Write {layer name: global [E] counts} (and free-form `meta`) to a JSON file."""
    data = {"format": DUMP_FORMAT, "meta": meta or {},
            "layers": {name: [int(v) for v in (c.tolist() if torch.is_tensor(c) else c)]
                       for name, c in layers.items()}}
    with open(path, "w") as f:
        json.dump(data, f)


def load_stats(path: str) -> Dict[str, List[int]]:
    """Read a dump written by `dump_stats` (JSON only: nothing is unpickled)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        raise ValueError(f"{path}: not a {DUMP_FORMAT} dump")
    layers = data["layers"]
    if not layers:
        raise ValueError(f"{path}: the dump holds no layers")
    n = {len(v) for v in layers.values()}
    if len(n) != 1:
        raise ValueError(f"{path}: layers have different expert counts {sorted(n)}")
    return {str(k): [int(x) for x in v] for k, v in layers.items()}


def summarize(counts: Sequence[int]) -> dict:
    n = len(counts)
    total = sum(counts)
    mean = total / n if n else 0.0
    mx = max(counts) if n else 0
    return {"experts": n, "total": total, "min": min(counts) if n else 0, "mean": mean, "max": mx,
            "imbalance": (mx / mean) if mean > 0 else float("nan")}


def format_table(layers: Dict[str, Sequence[int]], per_expert: bool = True) -> str:
    """Per-layer summary (min / mean / max / imbalance = max/mean) and, if asked, per-expert counts."""
    lines = ["| layer | pairs | min | mean | max | imbalance (max/mean) |", "|---|---|---|---|---|---|"]
    for name, c in layers.items():
        s = summarize(list(c))
        lines.append(f"| {name} | {s['total']} | {s['min']} | {s['mean']:.2f} | {s['max']} | "
                     f"{s['imbalance']:.2f} |")
    if per_expert:
        names = list(layers)
        lines += ["", "| expert | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        num_e = len(next(iter(layers.values())))
        for e in range(num_e):
            lines.append(f"| {e} | " + " | ".join(str(layers[n][e]) for n in names) + " |")
    return "\n".join(lines)


def write_heatmap_png(path: str, layers: Dict[str, Sequence[int]], cell: int = 8) -> None:
    """A layer (rows) x expert (columns) heat map, white = 0 to dark red = the maximum count."""
    rows = [list(v) for v in layers.values()]
    vmax = max(max(r) for r in rows) or 1
    pixels = []
    for r in rows:
        line = []
        for v in r:
            t = v / vmax
            line += [(255 - int(95 * t), int(255 * (1 - t)), int(255 * (1 - t)))] * cell
        pixels += [line] * cell
    write_png(path, pixels)


def write_png(path: str, pixels) -> None:
    """An RGB PNG from rows of (r, g, b) tuples, written with zlib only (no plotting dependency)."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + b"".join(bytes(p) for p in row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mega_moe_layer.stats",
                                description="Print the expert-load table of a statistics dump.")
    p.add_argument("dump", help="JSON file written by mega_moe_layer.stats.dump_stats")
    p.add_argument("--png", metavar="OUT.png", help="also write a layer x expert heat map")
    p.add_argument("--summary", action="store_true", help="per-layer summary only")
    args = p.parse_args(argv)
    layers = load_stats(args.dump)
    print(format_table(layers, per_expert=not args.summary))
    if args.png:
        write_heatmap_png(args.png, layers)
        print(f"heat map written to {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
