"""Cross-GPU barrier over symmetric signal words, with a bounded spin (Triton).

Every rank owns a symmetric int64 `signals` slot [R, 8]. Column 0 of row s on rank d counts the
barrier arrivals of rank s at rank d (monotonic: never reset, so nothing needs cleaning between
calls); column 1 of the own row holds this rank's barrier epoch. A barrier:

1. release: system-scope fence, then `signals[rank, 0] += 1` on every peer (atomic, release, sys);
2. acquire: spin until every local `signals[s, 0] >= epoch + 1` (atomic read, acquire, sys),
   bounded by `timeout_ns` of %globaltimer; on timeout write (1, rank, phase, peer) into a pinned
   host word array and `trap` — the Python side reads that array (no CUDA call needed once the
   context is dead) and raises an error naming the rank and phase;
3. store epoch + 1.

NOTE: the epoch lives on the device and every rank executes the same sequence of barriers
(DESIGN: every rank calls forward the same number of times), so epochs agree without a host
round trip and the barrier replays inside a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["symmetric_barrier", "PHASES", "TimeoutInfo", "pdl_enter"]

#: Phase ids written on timeout (index -> name), so the message names the phase.
PHASES = ("dispatch", "combine", "test")


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def pdl_enter():
    """Programmatic dependent launch (`Launcher.enable_pdl`): wait until the previous kernel on
    the stream has completed and its memory is visible (`griddepcontrol.wait`), then let the next
    kernel launch (`griddepcontrol.launch_dependents`: its CTAs are scheduled once every CTA here
    has passed this point, and wait in their own `pdl_enter`). Called first thing by every kernel
    of the layer's chain (kernels 2-8): the launch latency of one overlaps the run of the other.
    Both instructions are no-ops in a launch without the attribute. sm_90+ only."""
    tl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _barrier_kernel(peer_bases_ptr, signals_off, info_ptr, rank, num_ranks, timeout_ns, phase,
                    ARRIVE: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        pdl_enter()
    my_base = tl.load(peer_bases_ptr + rank)
    my_signals = (my_base + signals_off).to(tl.pointer_type(tl.int64))
    epoch = tl.load(my_signals + rank * 8 + 1) + 1
    if ARRIVE:
        for r in range(num_ranks):
            peer = (tl.load(peer_bases_ptr + r) + signals_off).to(tl.pointer_type(tl.int64))
            tl.atomic_add(peer + rank * 8, 1, sem="release", scope="sys")
    start = _globaltimer()
    for s in range(num_ranks):
        seen = tl.atomic_add(my_signals + s * 8, 0, sem="acquire", scope="sys")
        while seen < epoch:
            if _globaltimer() - start > timeout_ns:
                tl.store(info_ptr + 1, rank)
                tl.store(info_ptr + 2, phase)
                tl.store(info_ptr + 3, s)
                tl.atomic_xchg(info_ptr, 1, sem="release", scope="sys")
                _trap()
            seen = tl.atomic_add(my_signals + s * 8, 0, sem="acquire", scope="sys")
    tl.store(my_signals + rank * 8 + 1, epoch)


class TimeoutInfo:
    """Pinned host int32 [4] the barrier writes before trapping: (flag, rank, phase, peer)."""

    def __init__(self):
        self.words = torch.zeros(4, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        self._flag = self.words.numpy()      # a host view: reading it is a plain memory load

    def check(self) -> None:
        """Raise RuntimeError if a barrier timed out (readable after the CUDA context died)."""
        if not self._flag[0]:
            return
        flag, rank, phase, peer = (int(v) for v in self.words.tolist())
        if flag:
            name = PHASES[phase] if 0 <= phase < len(PHASES) else str(phase)
            raise RuntimeError(f"mega_moe_layer: rank {rank} timed out in the {name} barrier waiting "
                               f"for rank {peer}; the kernel trapped (a peer did not call forward, "
                               f"or crashed). The CUDA context of this process is no longer usable.")


def symmetric_barrier(peer_bases: torch.Tensor, signals_offset: int, rank: int, num_ranks: int,
                      info: TimeoutInfo, timeout_s: float, phase: str, _arrive: bool = True) -> None:
    """Stream-ordered barrier across the ranks of a symmetric workspace (one tiny launch).

    peer_bases: int64 [R] device addresses of every rank's workspace base (own one included);
    signals_offset: byte offset of the int64 [R, 8] `signals` slot. `_arrive=False` (tests only)
    skips this rank's arrivals, which forces a timeout.
    """
    grid, args, kwargs = barrier_args(peer_bases, signals_offset, rank, num_ranks, info, timeout_s,
                                      phase, _arrive)
    _barrier_kernel[grid](*args, **kwargs)


def barrier_args(peer_bases: torch.Tensor, signals_offset: int, rank: int, num_ranks: int,
                 info: TimeoutInfo, timeout_s: float, phase: str, _arrive: bool = True):
    """(grid, args, kwargs) of one `_barrier_kernel` launch (arguments as `symmetric_barrier`)."""
    return ((1,), (peer_bases, signals_offset, info.words, rank, num_ranks, int(timeout_s * 1e9),
                   PHASES.index(phase)), dict(ARRIVE=_arrive, num_warps=1))
