"""Dispatch: pull the tokens routed to this rank's experts from every peer over NVLink.

Pull, not push. NOTE (bytes moved, per destination rank d and source s): d reads s's `topk_idx`
rows (4 K bytes a token: 32 B for K = 8, under 1% of a 7168-byte FP8 row) and then only the token
rows it needs, each once however many of d's experts the token selected — the same payload a push
would write, but d learns the counts by reading them rather than s writing counts plus a signal
per destination, and no slot of d is written by a peer before d is ready for it.

Two launches after the pre-dispatch barrier (both read every peer's `topk_idx`, which is small):

1. `_count_plan_kernel` (`dispatch_count_plan`): pairs per local expert (atomics) -> `counts`;
   the last program to finish (a ticket counter) turns them into everything the later stages
   need: `expert_offsets` [E_local + 1], the GEMM tile map(s) (`tile_expert`, `tile_row_start`,
   `num_tiles`, exactly as `l1_gemm.build_tile_map` defines them), the statistics (`last`,
   `cumulative`), and leaves `counts`, `cursor` and the ticket at zero for the fill and the next
   call. (`_count_kernel` / `dispatch_count` is the bare count, kept for tests.)
2. `_fill_kernel`: for each (source s, token t) that hits this rank, copy its row (and scales and
   top-k weights) into the receive pool at row s * T_max + t, and for each local slot k append a
   pair at `expert_offsets[e] + atomic cursor`: pool row, top-k weight, and the absolute address
   of row (t, k) of s's `combine` slot, where the L2 epilogue will store y_k.

Pair order within an expert depends on atomics; every row's arithmetic is independent of its
position, so results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sync import pdl_enter

__all__ = ["dispatch_count", "dispatch_count_plan", "dispatch_fill"]


@triton.jit
def _local_slots(peer_bases_ptr, s, idx_off, t, Tmax, rank, El, K: tl.constexpr, KP: tl.constexpr):
    base = tl.load(peer_bases_ptr + s)
    idx_ptr = (base + idx_off).to(tl.pointer_type(tl.int32))
    k = tl.arange(0, KP)
    m = (t < Tmax)[:, None] & (k < K)[None, :]
    ids = tl.load(idx_ptr + t[:, None] * K + k[None, :], mask=m, other=-1)
    loc = ids - rank * El
    is_local = m & (ids >= 0) & (loc >= 0) & (loc < El)
    return base, k, loc, is_local


@triton.jit
def _count_kernel(peer_bases_ptr, idx_off, counts_ptr, rank, El, Tmax,
                  K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    s = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    _, _, loc, is_local = _local_slots(peer_bases_ptr, s, idx_off, t, Tmax, rank, El, K, KP)
    tl.atomic_add(counts_ptr + loc, 1, mask=is_local, sem="relaxed")


#: "No bad row" for the first-bad-row word of the pre-dispatch validation; also a large sentinel.
INT32_MAX = 2**31 - 1


@triton.jit
def _write_tile_map(tiles, base, bm, e, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr, prev, max_tiles,
                    BLOCK_J: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """One tile map (`l1_gemm._fill_tile_map`): tiles[e] tiles of bm rows from base[e] (tiles is 0
    past the local experts). Each expert writes its own tiles, BLOCK_J at a time, for as many
    rounds as the largest expert needs (one at decode: an [EP, BLOCK_J] store, not a search of
    every tile among the experts). Only the rows [num_tiles, previous num_tiles) past the new count
    are cleared (to -1 / 0); prev: the count before this call (*num_tiles_ptr)."""
    ends = tl.cumsum(tiles, axis=0)                         # inclusive
    starts = ends - tiles
    total = tl.sum(tiles, axis=0)
    nt = tl.minimum(total, max_tiles)
    tl.store(num_tiles_ptr, nt)
    most = tl.max(tiles, axis=0)
    j = tl.arange(0, BLOCK_J)
    for j0 in range(0, most, BLOCK_J):
        jj = j0 + j
        tt = starts[:, None] + jj[None, :]
        ok = (jj[None, :] < tiles[:, None]) & (tt < max_tiles)
        tl.store(tile_expert_ptr + tt, e[:, None] + 0 * jj[None, :], mask=ok)
        tl.store(tile_row_start_ptr + tt, base[:, None] + jj[None, :] * bm, mask=ok)
    for c0 in range(nt, prev, BLOCK_TILES):
        tt = c0 + tl.arange(0, BLOCK_TILES)
        m = tt < prev
        tl.store(tile_expert_ptr + tt, tl.full((BLOCK_TILES,), -1, tl.int32), mask=m)
        tl.store(tile_row_start_ptr + tt, tl.zeros((BLOCK_TILES,), tl.int32), mask=m)


@triton.jit(do_not_specialize=["block_m", "max_tiles", "tail_block_m", "tail_max", "tail_max_tiles", "over",
                               "over_limit"])
def _count_plan_kernel(peer_bases_ptr, idx_off, counts_ptr, ticket_ptr, offsets_ptr, cursor_ptr,
                       tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr, stats_last_ptr,
                       stats_cum_ptr, recv_count_ptr, tail_expert_ptr, tail_row_start_ptr, tail_num_ptr,
                       rank, El, Tmax, block_m, max_tiles, tail_block_m, tail_max, tail_max_tiles,
                       over, over_limit, K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, EP: tl.constexpr,
                       BLOCK_J: tl.constexpr, BLOCK_TILES: tl.constexpr, STATS: tl.constexpr,
                       RECV_LIST: tl.constexpr,
                       TAIL: tl.constexpr, PDL: tl.constexpr = False):
    """Count, then (last program only) plan. EP >= El is a power of two. RECV_LIST: also zero the
    counter of the fill's list of received rows (`_fill_kernel`). TAIL: a two-height plan
    (`gemm_heuristics.TilePlan`): remainders r = n % block_m with 0 < r <= tail_max go to tiles of
    tail_block_m rows in the second map (`l1_gemm.build_tile_map`'s tail_out). over / over_limit
    (`TilePlan.over` / `over_limit`, 0 / 0 without): an expert's last full tile takes the first
    min(r, over) rows of a remainder r <= over_limit, and only the rest is tiled.

    Worked example (El = 3, block_m = 16, counts [3, 0, 37], 6 tile rows): offsets [0, 3, 3, 40],
    tiles per expert [1, 0, 3], tile_expert [0, 2, 2, 2, -1, -1], tile_row_start
    [0, 3, 19, 35, 0, 0], num_tiles [4]. Tile rows past num_tiles keep -1 / 0: only the rows
    [num_tiles, previous num_tiles) are cleared, so the arrays must start as -1 / 0.
    """
    if PDL:
        pdl_enter()
    s = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    _, _, loc, is_local = _local_slots(peer_bases_ptr, s, idx_off, t, Tmax, rank, El, K, KP)
    old = tl.atomic_add(counts_ptr + loc, 1, mask=is_local, sem="relaxed")
    # NOTE: the returned values make every thread wait until its increments are performed (at the
    # device's coherence point) before the block-wide sum, hence before the ticket: the last
    # program then reads complete counts (with atomics, from the same point).
    seen = tl.sum(tl.sum(tl.where(is_local, old, 0), axis=1), axis=0)
    inc = tl.where(seen < 0, 2, 1)                          # always 1: counts are never negative
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    # NOTE: what the last program reads besides the counts (written only by the previous call's
    # last program, complete before this launch) is loaded by every program before the ticket,
    # so that after it the last program waits for one memory round trip (the counts), not three.
    e = tl.arange(0, EP)
    em = e < El
    if STATS:
        cum = tl.load(stats_cum_ptr + e, mask=em, other=0)
    prev = tl.load(num_tiles_ptr)
    if TAIL:
        prev_tail = tl.load(tail_num_ptr)
    ticket = tl.atomic_add(ticket_ptr, inc, sem="acq_rel")
    if ticket == num_programs - 1:
        c = tl.atomic_xchg(counts_ptr + e, 0, mask=em, sem="relaxed")   # read and reset
        c = tl.where(em, c, 0)
        incl = tl.cumsum(c, axis=0)
        excl = incl - c
        tl.store(offsets_ptr + 1 + e, incl, mask=em)
        tl.store(offsets_ptr + e, excl, mask=e == 0)
        tl.store(cursor_ptr + e, 0, mask=em)
        if STATS:
            tl.store(stats_last_ptr + e, c, mask=em)
            tl.store(stats_cum_ptr + e, cum + c, mask=em)
        full = c // block_m
        r = c - full * block_m
        ov = tl.where((full > 0) & (r <= over_limit), tl.minimum(r, over), 0)    # rows the last full tile takes
        r = r - ov
        if TAIL:
            tail = tl.where((r > 0) & (r <= tail_max), (r + tail_block_m - 1) // tail_block_m, 0)
            _write_tile_map(full + (r > tail_max).to(tl.int32), excl, block_m, e, tile_expert_ptr,
                            tile_row_start_ptr, num_tiles_ptr, prev, max_tiles, BLOCK_J, BLOCK_TILES)
            _write_tile_map(tail, excl + full * block_m + ov, tail_block_m, e, tail_expert_ptr,
                            tail_row_start_ptr, tail_num_ptr, prev_tail, tail_max_tiles, BLOCK_J, BLOCK_TILES)
        else:
            _write_tile_map(full + (r > 0).to(tl.int32), excl, block_m, e, tile_expert_ptr,
                            tile_row_start_ptr, num_tiles_ptr, prev, max_tiles, BLOCK_J, BLOCK_TILES)
        if RECV_LIST:
            tl.store(recv_count_ptr, 0)
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


@triton.jit
def _fill_kernel(peer_bases_ptr, idx_off, w_off, x_off, xsf_off, comb_off, combsf_off,
                 my_base, pool_off, pool_sf_off,
                 offsets_ptr, cursor_ptr, pair_rows_ptr, pair_w_ptr, pair_dst_ptr, pair_dst_sf_ptr,
                 recv_rows_ptr, recv_count_ptr, rank, El, Tmax,
                 X_WORDS: tl.constexpr, SF_WORDS: tl.constexpr, COMB_ROW_BYTES: tl.constexpr,
                 COMB_SF_ROW_BYTES: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                 BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, SF_CHUNK: tl.constexpr,
                 RECV_LIST: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        pdl_enter()
    s = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    base, k, loc, is_local = _local_slots(peer_bases_ptr, s, idx_off, t, Tmax, rank, El, K, KP)
    need = tl.sum(is_local.to(tl.int32), axis=1) > 0                        # [BLOCK_T]

    # Pairs: one per local slot.
    pos = tl.atomic_add(cursor_ptr + loc, 1, mask=is_local, sem="relaxed")
    pos = pos + tl.load(offsets_ptr + loc, mask=is_local, other=0)
    wk = tl.load((base + w_off).to(tl.pointer_type(tl.float32)) + t[:, None] * K + k[None, :],
                 mask=is_local, other=0.0)
    row = s * Tmax + t
    tl.store(pair_rows_ptr + pos, (row[:, None] + 0 * k[None, :]).to(tl.int32), mask=is_local)
    tl.store(pair_w_ptr + pos, wk, mask=is_local)
    tk = (t[:, None] * K + k[None, :]).to(tl.int64)
    tl.store(pair_dst_ptr + pos, base + comb_off + tk * COMB_ROW_BYTES, mask=is_local)
    if COMB_SF_ROW_BYTES > 0:
        tl.store(pair_dst_sf_ptr + pos, base + combsf_off + tk * COMB_SF_ROW_BYTES, mask=is_local)

    if RECV_LIST:
        # The pool rows written by this call, once each (order from atomics): what a pass over
        # the received rows reads (the streamed FP8 path rebases x over them). The counter is
        # zeroed by this call's count+plan.
        slot = tl.atomic_add(recv_count_ptr + 0 * t, 1, mask=need, sem="relaxed")
        tl.store(recv_rows_ptr + slot, row, mask=need)

    # The token row (once per token, however many local slots) and its scales.
    src_x = (base + x_off).to(tl.pointer_type(tl.int32))
    dst_x = (my_base + pool_off).to(tl.pointer_type(tl.int32))
    t64 = t.to(tl.int64)
    r64 = row.to(tl.int64)
    for c0 in range(0, X_WORDS, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        m = need[:, None] & (c < X_WORDS)[None, :]
        v = tl.load(src_x + t64[:, None] * X_WORDS + c[None, :], mask=m)
        tl.store(dst_x + r64[:, None] * X_WORDS + c[None, :], v, mask=m)
    if SF_WORDS > 0:
        src_sf = (base + xsf_off).to(tl.pointer_type(tl.int32))
        dst_sf = (my_base + pool_sf_off).to(tl.pointer_type(tl.int32))
        for c0 in range(0, SF_WORDS, SF_CHUNK):
            c = c0 + tl.arange(0, SF_CHUNK)
            m = need[:, None] & (c < SF_WORDS)[None, :]
            v = tl.load(src_sf + t64[:, None] * SF_WORDS + c[None, :], mask=m)
            tl.store(dst_sf + r64[:, None] * SF_WORDS + c[None, :], v, mask=m)


def _kp(K: int) -> int:
    return triton.next_power_of_2(K)


def dispatch_count(peer_bases: torch.Tensor, topk_idx_offset: int, counts: torch.Tensor, *,
                   rank: int, num_ranks: int, num_local_experts: int, max_tokens: int, topk: int,
                   block_t: int = 64) -> None:
    """counts int32 [E_local] += pairs every rank routes to each local expert (zero it first).

    peer_bases int64 [R]: workspace base addresses; topk_idx_offset: byte offset of the int32
    [T_max, K] `topk_idx` slot (rows beyond a rank's T hold -1, written by the pre-dispatch).
    """
    grid = (num_ranks, triton.cdiv(max_tokens, block_t))
    _count_kernel[grid](peer_bases, topk_idx_offset, counts, rank, num_local_experts, max_tokens,
                        K=topk, KP=_kp(topk), BLOCK_T=block_t, num_warps=4)


def count_plan_args(peer_bases: torch.Tensor, topk_idx_offset: int, counts: torch.Tensor,
                    ticket: torch.Tensor, expert_offsets: torch.Tensor, cursor: torch.Tensor,
                    tile_expert: torch.Tensor, tile_row_start: torch.Tensor, num_tiles: torch.Tensor,
                    stats_last, stats_cumulative, *, rank: int, num_ranks: int,
                    num_local_experts: int, max_tokens: int, topk: int, block_m: int,
                    block_t: int = 64, block_tiles: int = 64, recv_count=None,
                    tail_block_m: int = 0, tail_max: int = 0, tail_maps=None, over: int = 0, block_j: int = 0):
    """(grid, args, kwargs) of one `_count_plan_kernel` launch (for a `Launcher` or a plain call).
    recv_count: the int32 [1] counter of the fill's received-row list, zeroed here (or None).
    tail_block_m / tail_max / tail_maps (tile_expert, tile_row_start, num_tiles): the second map
    of a two-height plan (`gemm_heuristics.TilePlan`), tail_max 0 for one height. over: the plan's
    rows past block_m in an expert's last full tile (`TilePlan.over`; 0: none). block_j: tiles
    per expert written per round (a power of two; 0: ~2048 / E_local, see below)."""
    El = num_local_experts
    stats = stats_last is not None
    tail = tail_max > 0
    if tail and (tail_maps is None or len(tail_maps) != 3 or not 1 <= tail_block_m <= block_m
                 or tail_max >= block_m):
        raise ValueError(f"count_plan_args: a tail (tail_max {tail_max}) needs tail_maps = (tile_expert, "
                         f"tile_row_start, num_tiles) and 1 <= tail_block_m ({tail_block_m}) <= block_m "
                         f"({block_m}) > tail_max")
    if over and not 0 < over < block_m:
        raise ValueError(f"count_plan_args: over ({over}) must be in [0, block_m = {block_m})")
    te2, trs2, nt2 = tail_maps if tail else (tile_expert, tile_row_start, num_tiles)
    grid = (num_ranks, triton.cdiv(max_tokens, block_t))
    args = (peer_bases, topk_idx_offset, counts, ticket, expert_offsets, cursor, tile_expert,
            tile_row_start, num_tiles, stats_last if stats else counts,
            stats_cumulative if stats else counts, recv_count if recv_count is not None else counts,
            te2, trs2, nt2, rank, El, max_tokens, block_m, tile_expert.numel(),
            tail_block_m if tail else block_m, tail_max, te2.numel(), over, max(over, tail_max) if over else 0)
    EP = triton.next_power_of_2(El)
    # NOTE: tile maps are written [EP, BLOCK_J] at a time (~2048 stores a round, one round unless
    # an expert has more than BLOCK_J tiles).
    kwargs = dict(K=topk, KP=_kp(topk), BLOCK_T=block_t, EP=EP, BLOCK_J=block_j or max(1, 2048 // EP),
                  BLOCK_TILES=block_tiles, STATS=stats, RECV_LIST=recv_count is not None, TAIL=tail,
                  num_warps=4)
    return grid, args, kwargs


def dispatch_count_plan(peer_bases: torch.Tensor, topk_idx_offset: int, counts: torch.Tensor,
                        ticket: torch.Tensor, expert_offsets: torch.Tensor, cursor: torch.Tensor,
                        tile_expert: torch.Tensor, tile_row_start: torch.Tensor,
                        num_tiles: torch.Tensor, stats_last=None, stats_cumulative=None, **kw) -> None:
    """Count the pairs every rank routes to each local expert and plan the GEMMs, in one launch.

    counts int32 [E_local], ticket int32 [1], cursor int32 [E_local]: zero on entry, zero again on
    return. Outputs: expert_offsets int32 [E_local + 1] (exclusive prefix sums of the counts),
    tile_expert / tile_row_start int32 [max_tiles] and num_tiles int32 [1] (`build_tile_map`'s
    arrays for `block_m`; they must hold -1 / 0 / 0 before the first call), and, when given,
    stats_last = counts, stats_cumulative += counts (int32 [E_local]). Keyword arguments as
    `dispatch_count` plus block_m (the GEMM tile height) and optionally a two-height plan's tail
    (`count_plan_args`).
    """
    grid, args, kwargs = count_plan_args(peer_bases, topk_idx_offset, counts, ticket, expert_offsets,
                                         cursor, tile_expert, tile_row_start, num_tiles, stats_last,
                                         stats_cumulative, **kw)
    _count_plan_kernel[grid](*args, **kwargs)


def dispatch_fill(peer_bases: torch.Tensor, offsets: dict, expert_offsets: torch.Tensor,
                  cursor: torch.Tensor, pair_rows: torch.Tensor, pair_weights: torch.Tensor,
                  pair_dst: torch.Tensor, pair_dst_sf: torch.Tensor, *, my_base: int, rank: int,
                  num_ranks: int,
                  num_local_experts: int, max_tokens: int, topk: int, x_row_bytes: int,
                  sf_row_bytes: int, comb_row_bytes: int, comb_sf_row_bytes: int,
                  block_t: int = 4, chunk: int = 0, recv_rows=None, recv_count=None) -> None:
    """Pull rows into the pool and write the expert-contiguous pair arrays (see module doc).

    my_base: this rank's workspace base address (host int, fixed at workspace creation).
    offsets: byte offsets of the slots "topk_idx", "topk_weights", "x", "x_sf", "combine",
    "combine_sf", "recv_x", "recv_x_sf". expert_offsets int32 [E_local + 1] (exclusive prefix sums
    of the counts), cursor int32 [E_local] zeroed; pair_rows int32 [P], pair_weights float32 [P],
    pair_dst / pair_dst_sf int64 [P] outputs.
    """
    grid, args, kwargs = fill_args(
        peer_bases, offsets, expert_offsets, cursor, pair_rows, pair_weights, pair_dst, pair_dst_sf,
        my_base=my_base, rank=rank, num_ranks=num_ranks, num_local_experts=num_local_experts,
        max_tokens=max_tokens, topk=topk, x_row_bytes=x_row_bytes, sf_row_bytes=sf_row_bytes,
        comb_row_bytes=comb_row_bytes, comb_sf_row_bytes=comb_sf_row_bytes, block_t=block_t,
        chunk=chunk, recv_rows=recv_rows, recv_count=recv_count)
    _fill_kernel[grid](*args, **kwargs)


def fill_args(peer_bases, offsets, expert_offsets, cursor, pair_rows, pair_weights, pair_dst,
              pair_dst_sf, *, my_base, rank, num_ranks, num_local_experts, max_tokens, topk,
              x_row_bytes, sf_row_bytes, comb_row_bytes, comb_sf_row_bytes, block_t=4, chunk=0,
              recv_rows=None, recv_count=None):
    """(grid, args, kwargs) of one `_fill_kernel` launch (arguments as `dispatch_fill`). recv_rows
    int32 [R T_max] / recv_count int32 [1] (zeroed by count+plan): the list of the pool rows this
    call writes, or None. chunk: int32 words of a row copied per step (0: the whole row up to 2048
    words, i.e. an FP8 row of H <= 8192 in one step)."""
    assert (recv_rows is None) == (recv_count is None)
    assert x_row_bytes % 4 == 0 and sf_row_bytes % 4 == 0
    grid = (num_ranks, triton.cdiv(max_tokens, block_t))
    args = (peer_bases, offsets["topk_idx"], offsets["topk_weights"], offsets["x"], offsets["x_sf"],
            offsets["combine"], offsets["combine_sf"], my_base, offsets["recv_x"],
            offsets["recv_x_sf"], expert_offsets, cursor, pair_rows, pair_weights, pair_dst,
            pair_dst_sf, recv_rows if recv_rows is not None else pair_rows,
            recv_count if recv_count is not None else cursor, rank, num_local_experts, max_tokens)
    # NOTE: each step's stores need its loads' data, so a row copied in n steps costs n memory
    # round trips in a row (the next load issues after the previous store): at decode one program
    # copies the few routed rows alone, so the whole FP8 row goes in one step (8 warps: 32 words
    # a thread at 4 rows).
    chunk = chunk or min(2048, triton.next_power_of_2(max(x_row_bytes, 4) // 4))
    kwargs = dict(X_WORDS=x_row_bytes // 4, SF_WORDS=sf_row_bytes // 4, COMB_ROW_BYTES=comb_row_bytes,
                  COMB_SF_ROW_BYTES=comb_sf_row_bytes, K=topk, KP=_kp(topk), BLOCK_T=block_t,
                  CHUNK=chunk, SF_CHUNK=min(chunk, triton.next_power_of_2(max(sf_row_bytes, 4) // 4)),
                  RECV_LIST=recv_rows is not None, num_warps=8 if block_t * chunk >= 4096 else 4)
    return grid, args, kwargs
