"""The symmetric workspace: one allocation per process group, sliced into typed slots.

Its size is a pure function of the config and the world size (`workspace_layout`,
`workspace_nbytes`), CPU-testable; `SymmetricWorkspace` lays it over one NVSHMEM allocation,
`CPUWorkspace` over one CPU uint8 tensor, so kernels, the torch backend and the tests share one
layout.

Symbols: T = cfg.max_tokens_per_rank, R = num_ranks, E_l = E / R (local experts), K = topk,
H = hidden, I = intermediate, g = cfg.act_group_size, P = R*T*min(K, E_l) + 128*E_l (pair rows:
every (source rank, token) reaches at most min(K, E_l) local experts, plus up to one 128-row GEMM
tile of padding per local expert). "act [n, c]" is the activation format of cfg.act_format:
float8_e4m3fn [n, c] (fp8), int8 [n, c/2] (fp4, two E2M1 codes per byte), bfloat16 [n, c] (bf16).
Scale slots hold packed UE8M0 bytes (4 per int32) and have 0 columns when act_format is bf16.

Every slot starts at a multiple of 128 bytes; slots never overlap; the total is a multiple of 128.
"peer r" below may be this rank itself (a token routed to a local expert goes through the same
path, through this rank's own base address).

| slot              | dtype [shape]               | bytes                     | written by                                   | read by                                  |
|-------------------|-----------------------------|---------------------------|----------------------------------------------|------------------------------------------|
| signals           | int64 [R, 8]                | 64 R                      | peer r, row r (system-scope release)         | local spin-waits (acquire); reset locally |
| counters          | int32 [64]                  | 256                       | local kernels (atomics); [0] = error counter | local kernels; `check_errors()` on host  |
| counts            | int32 [R, E_l]              | 4 R E_l                   | peer r, row r: pairs it sends per local expert | local: prefix sums -> pair_rows, stats  |
| x                 | act [T, H]                  | T H (fp8), T H/2 (fp4), 2 T H (bf16) | local pre-dispatch                | local dispatch (pushes rows to peers)    |
| x_sf              | int32 [T, H/g/4]            | T H / g (0 for bf16)      | local pre-dispatch                           | local dispatch                           |
| topk_idx          | int32 [T, K]                | 4 T K                     | local pre-dispatch                           | local dispatch                           |
| topk_weights      | float32 [T, K]              | 4 T K                     | local pre-dispatch                           | local dispatch                           |
| recv_x            | act [R T, H]                | R x the bytes of x        | peer r, rows [r T, (r+1) T) (one row per token, however many local experts it hits) | local L1 GEMM (through pair_rows) |
| recv_x_sf         | int32 [R T, H/g/4]          | R T H / g (0 for bf16)    | peer r, same rows                            | local L1 GEMM                            |
| recv_topk_idx     | int32 [R T, K]              | 4 R T K                   | peer r, same rows                            | local pair_rows build                    |
| recv_topk_weights | float32 [R T, K]            | 4 R T K                   | peer r, same rows                            | local L1 epilogue (weight applied to h)  |
| recv_src          | int32 [R T]                 | 4 R T                     | peer r: the row's token index on rank r      | local L2 epilogue (combine destination)  |
| pair_rows         | int32 [P]                   | 4 P                       | local, after dispatch: pool rows, expert-contiguous, each expert padded to 128 | local L1 / L2 GEMMs |
| h                 | act [P, I]                  | P I (fp8), P I/2 (fp4), 2 P I (bf16) | local L1 epilogue                 | local L2 GEMM                            |
| h_sf              | int32 [P, I/32/4]           | P I / 32 (0 for bf16)     | local L1 epilogue                            | local L2 GEMM                            |
| combine           | bf16 or e4m3 [T, K, H]      | 2 T K H (bf16), T K H (fp8) | peer r's L2 epilogue: row (t, k) of this rank's token t | local combine reduce          |
| combine_sf        | int32 [T, K, H/128/4]       | T K H / 128 (fp8 combine, else 0) | peer r's L2 epilogue                 | local combine reduce                     |

# NOTE: the control slots (signals, counters) come first and depend only on R, so every config
# laid over one shared allocation finds them at the same offsets: a layer that leaves them clean
# (DESIGN: "after every call the workspace is clean") leaves them clean for a layer with another
# config. All other slots are fully overwritten before being read in each call.

Sharing (DESIGN: "several layers share one symmetric workspace"): `get_workspace(cfg, group)`
returns a handle bound to the one allocation of that group; the first config sizes it, unless
`reserve(cfgs, group)` was called first with all configs of the model. A later config that does not
fit raises ValueError with both sizes. Each config's handle lays that config's own layout over the
same bytes (layers run one after another, so their slots may alias).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import warnings
import weakref
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from ..config import COMBINE_FP8_GROUP, H_GROUP, MegaMoEConfig
from . import bootstrap

__all__ = [
    "Slot",
    "WorkspaceLayout",
    "workspace_layout",
    "workspace_nbytes",
    "SLOT_ROLES",
    "SymmetricWorkspace",
    "CPUWorkspace",
    "WorkspaceRegistry",
    "get_workspace",
    "reserve",
    "destroy_workspace",
    "destroy_all_workspaces",
    "shared_scratch",
    "ALIGN_BYTES",
    "NUM_COUNTERS",
    "NUM_SIGNALS_PER_PEER",
    "COUNTER_ERROR",
    "GEMM_TILE_ROWS",
]

#: Every slot offset is a multiple of this (one 128-byte line: TMA / vector loads, no false sharing).
ALIGN_BYTES = 128
#: Scratch counters per rank (`counters` slot).
NUM_COUNTERS = 64
#: Index of the error counter (pairs dropped because of an out-of-range expert id) in `counters`.
COUNTER_ERROR = 0
#: Signal words per peer (`signals` slot).
NUM_SIGNALS_PER_PEER = 8
#: Row tile of the grouped GEMMs: each local expert's pair segment is padded to this.
GEMM_TILE_ROWS = 128
#: Largest element count / row count addressable with int32 indices.
INT32_MAX = 2 ** 31 - 1

#: Who writes and who reads each slot (the docstring table, for generated docs and tests).
SLOT_ROLES: Dict[str, Tuple[str, str]] = {
    "signals": ("peer r, row r (system-scope release)", "local spin-waits (acquire); reset locally"),
    "counters": ("local kernels (atomics); [0] is the error counter", "local kernels; check_errors()"),
    "counts": ("peer r, row r: pairs it sends to each local expert", "local: prefix sums, statistics"),
    "x": ("local pre-dispatch", "local dispatch"),
    "x_sf": ("local pre-dispatch", "local dispatch"),
    "topk_idx": ("local pre-dispatch", "local dispatch"),
    "topk_weights": ("local pre-dispatch", "local dispatch"),
    "recv_x": ("peer r, rows [r*T, (r+1)*T)", "local L1 GEMM (through pair_rows)"),
    "recv_x_sf": ("peer r, rows [r*T, (r+1)*T)", "local L1 GEMM"),
    "recv_topk_idx": ("peer r, rows [r*T, (r+1)*T)", "local pair_rows build"),
    "recv_topk_weights": ("peer r, rows [r*T, (r+1)*T)", "local L1 epilogue"),
    "recv_src": ("peer r: token index on rank r", "local L2 epilogue (combine destination)"),
    "pair_rows": ("local, after dispatch (expert-contiguous, padded)", "local L1 / L2 GEMMs"),
    "h": ("local L1 epilogue", "local L2 GEMM"),
    "h_sf": ("local L1 epilogue", "local L2 GEMM"),
    "combine": ("peer r's L2 epilogue: row (t, k) of this rank's token t", "local combine reduce"),
    "combine_sf": ("peer r's L2 epilogue", "local combine reduce"),
}


def _align(n: int, a: int = ALIGN_BYTES) -> int:
    return -(-n // a) * a


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One typed region of the workspace: bytes [offset, offset + nbytes) viewed as dtype[shape]."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclasses.dataclass(frozen=True)
class WorkspaceLayout:
    """The slots of one config at one world size, in address order; `nbytes` is the total."""

    cfg: MegaMoEConfig
    num_ranks: int
    slots: Tuple[Slot, ...]
    nbytes: int

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"workspace has no slot {name!r}; slots: {', '.join(self.names)}")

    def __getitem__(self, name: str) -> Slot:
        return self.slot(name)

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)


def _act(fmt: str, rows: int, cols: int) -> Tuple[torch.dtype, Tuple[int, int]]:
    if fmt == "fp8":
        return torch.float8_e4m3fn, (rows, cols)
    if fmt == "fp4":
        return torch.int8, (rows, cols // 2)
    return torch.bfloat16, (rows, cols)


def _sf_cols(fmt: str, cols: int, group: int) -> int:
    return 0 if fmt == "bf16" else _ceil_div(cols // group, 4)


def workspace_layout(cfg: MegaMoEConfig, num_ranks: int) -> WorkspaceLayout:
    """The workspace slots of `cfg` on `num_ranks` ranks (see the module docstring's table).

    Raises:
        TypeError: `cfg` is not a MegaMoEConfig.
        ValueError: bad `num_ranks` (not a positive int, or not dividing num_experts), or a config
            too big for int32 indices (a slot of more than 2^31 - 1 elements).
    """
    if not isinstance(cfg, MegaMoEConfig):
        raise TypeError(f"workspace_layout: expected a MegaMoEConfig, got {type(cfg).__name__}")
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks <= 0:
        raise ValueError(f"workspace_layout: num_ranks must be a positive int, got {num_ranks!r}")
    return _layout_cached(cfg, num_ranks)


@functools.lru_cache(maxsize=256)
def _layout_cached(cfg: MegaMoEConfig, num_ranks: int) -> WorkspaceLayout:
    R = num_ranks
    E_l = cfg.num_local_experts(R)  # ValueError when E % R != 0
    T, H, I, K, g = (cfg.max_tokens_per_rank, cfg.hidden, cfg.intermediate, cfg.topk,
                     cfg.act_group_size)
    P = R * T * min(K, E_l) + GEMM_TILE_ROWS * E_l
    act = cfg.act_format
    i32, f32 = torch.int32, torch.float32
    comb_dtype = torch.float8_e4m3fn if cfg.combine_format == "fp8" else torch.bfloat16
    comb_sf = _ceil_div(H // COMBINE_FP8_GROUP, 4) if cfg.combine_format == "fp8" else 0

    specs: List[Tuple[str, torch.dtype, Tuple[int, ...]]] = [
        # Control slots first: their offsets depend on R only (see the NOTE in the docstring).
        ("signals", torch.int64, (R, NUM_SIGNALS_PER_PEER)),
        ("counters", i32, (NUM_COUNTERS,)),
        ("counts", i32, (R, E_l)),
        ("x", *_act(act, T, H)),
        ("x_sf", i32, (T, _sf_cols(act, H, g))),
        ("topk_idx", i32, (T, K)),
        ("topk_weights", f32, (T, K)),
        ("recv_x", *_act(act, R * T, H)),
        ("recv_x_sf", i32, (R * T, _sf_cols(act, H, g))),
        ("recv_topk_idx", i32, (R * T, K)),
        ("recv_topk_weights", f32, (R * T, K)),
        ("recv_src", i32, (R * T,)),
        ("pair_rows", i32, (P,)),
        ("h", *_act(act, P, I)),
        ("h_sf", i32, (P, _sf_cols(act, I, H_GROUP))),
        ("combine", comb_dtype, (T, K, H)),
        ("combine_sf", i32, (T, K, comb_sf)),
    ]
    slots = []
    cursor = 0
    for name, dtype, shape in specs:
        numel = 1
        for s in shape:
            numel *= s
        rows = shape[0]
        if numel > INT32_MAX or rows > INT32_MAX:
            raise ValueError(
                f"MegaMoEConfig too big for int32 indices: workspace slot {name!r} {list(shape)} "
                f"has {numel} elements (> 2^31 - 1) at num_ranks={R}, "
                f"max_tokens_per_rank={T}; lower max_tokens_per_rank")
        offset = _align(cursor)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        slots.append(Slot(name, offset, nbytes, dtype, tuple(shape)))
        cursor = offset + nbytes
    return WorkspaceLayout(cfg, R, tuple(slots), max(_align(cursor), ALIGN_BYTES))


def workspace_nbytes(cfg: MegaMoEConfig, num_ranks: int) -> int:
    """Bytes of the workspace of `cfg` on `num_ranks` ranks (per rank; symmetric)."""
    return workspace_layout(cfg, num_ranks).nbytes


def max_workspace_nbytes(cfgs: Iterable[MegaMoEConfig], num_ranks: int) -> int:
    """Bytes of a workspace that fits every config of `cfgs` (their maximum)."""
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("max_workspace_nbytes: expected at least one config")
    return max(workspace_nbytes(c, num_ranks) for c in cfgs)


def _slice_view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    # NVSHMEM's allocator knows no fp8 dtypes: slice bytes, then reinterpret.
    return buffer[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


# ------------------------------------------------------------------------------------------------
# Allocations (one per shared workspace) and handles (one per config)
# ------------------------------------------------------------------------------------------------
class _Allocation:
    """Owns the bytes. Subclasses: CPU tensor, NVSHMEM symmetric tensor."""

    kind = "abstract"

    def __init__(self, nbytes: int, num_ranks: int, rank: int) -> None:
        self.nbytes = nbytes
        self.num_ranks = num_ranks
        self.rank = rank
        self.buffer: Optional[torch.Tensor] = None
        self.destroyed = False

    def peer_buffer(self, rank: int) -> torch.Tensor:
        raise RuntimeError(f"{type(self).__name__} has no peer buffers")

    def destroy(self) -> None:
        self.buffer = None
        self.destroyed = True


class _CPUAllocation(_Allocation):
    kind = "cpu"

    def __init__(self, nbytes: int, num_ranks: int) -> None:
        super().__init__(nbytes, num_ranks, 0)
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8)


_LIVE_LOCK = threading.Lock()
_LIVE_SYMMETRIC: "weakref.WeakValueDictionary[int, _NvshmemAllocation]" = weakref.WeakValueDictionary()
_SEQ = itertools.count()


def _nvshmem_tensor(nvshmem, nbytes: int) -> torch.Tensor:
    try:
        return nvshmem.tensor((nbytes,), dtype=torch.uint8, except_on_del=False)
    except TypeError:  # an nvshmem4py without except_on_del
        return nvshmem.tensor((nbytes,), dtype=torch.uint8)


class _StreamAdapter:
    """cuda.core stream protocol for a torch stream (when nvshmem4py lacks NvshmemStream)."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream

    def __cuda_stream__(self):
        return (0, int(self._stream.cuda_stream))


class _NvshmemAllocation(_Allocation):
    kind = "nvshmem"

    def __init__(self, nbytes: int, group, device) -> None:
        ctx = bootstrap.ensure_initialized(group, symmetric_size=nbytes, device=device)
        super().__init__(nbytes, ctx.num_ranks, ctx.rank)
        bootstrap.register_finalize_hook(_destroy_all_symmetric)
        self.group = group
        self.device = torch.device("cuda", ctx.device_index)
        self._nvshmem = bootstrap._import_nvshmem()
        with torch.cuda.device(self.device):
            try:
                buf = _nvshmem_tensor(self._nvshmem, nbytes)
            except Exception as e:
                self.destroyed = True  # nothing to free; keeps __del__ quiet
                raise RuntimeError(
                    f"mega_moe_layer: allocating a {nbytes}-byte symmetric workspace failed on rank "
                    f"{ctx.rank} (NVSHMEM heap {ctx.heap_bytes} bytes; size it for the largest "
                    f"config before the first workspace with reserve(cfgs)): {e!r}") from e
            self.buffer = buf
            # NOTE: get_peer_tensor(buf, own_pe) would return `buf`'s own tracked buffer with its
            # reference count raised, so free_tensor would no longer free it (leak): use `buf`.
            peers: List[Optional[torch.Tensor]] = []
            for r in range(ctx.num_ranks):
                if r == ctx.rank:
                    peers.append(buf)
                    continue
                try:
                    peers.append(self._nvshmem.get_peer_tensor(buf, r))
                except Exception:  # no load/store path (e.g. another node): proxy transport only
                    peers.append(None)
            self._peers = peers
            self.peer_bases = torch.tensor([p.data_ptr() if p is not None else 0 for p in peers],
                                           dtype=torch.int64, device=self.device)
            buf.zero_()
        self.seq = next(_SEQ)
        with _LIVE_LOCK:
            _LIVE_SYMMETRIC[self.seq] = self
        # No peer may write into this rank's workspace before it is zeroed.
        self.barrier()

    def peer_buffer(self, rank: int) -> torch.Tensor:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"peer rank {rank} out of range [0, {self.num_ranks})")
        p = self._peers[rank]
        if p is None:
            raise RuntimeError(f"rank {rank} is not reachable by loads/stores from rank "
                               f"{self.rank} (nvshmem_ptr is NULL: no NVLink/P2P path)")
        return p

    def barrier(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        if self.destroyed:
            raise RuntimeError("symmetric workspace already destroyed")
        stream = torch.cuda.current_stream(self.device) if stream is None else stream
        nv = self._nvshmem
        barrier_all = getattr(nv, "barrier_all", None)
        if barrier_all is None:
            # Fallback (nvshmem4py without stream-ordered barriers): host-blocking.
            import torch.distributed as dist
            torch.cuda.synchronize(self.device)
            if dist.is_available() and dist.is_initialized():
                dist.barrier(group=self.group)
            return
        wrapper = getattr(nv, "NvshmemStream", None)
        barrier_all(stream=wrapper(stream) if wrapper is not None else _StreamAdapter(stream))

    def destroy(self) -> None:
        if self.destroyed:
            return
        with _LIVE_LOCK:
            _LIVE_SYMMETRIC.pop(self.seq, None)
        torch.cuda.synchronize(self.device)  # no kernel may still use the memory
        buf = self.buffer
        self._peers = []
        self.peer_bases = None
        self.buffer = None
        self.destroyed = True
        if buf is not None and bootstrap.is_initialized():
            with torch.cuda.device(self.device):
                self._nvshmem.free_tensor(buf)  # collective

    def __del__(self) -> None:
        # Only warn: freeing is collective and must never run from a garbage collector.
        try:
            if not self.destroyed and bootstrap.is_initialized():
                warnings.warn(
                    f"mega_moe_layer: symmetric workspace of {self.nbytes} bytes was not destroyed; "
                    f"call destroy() (collective) or bootstrap.finalize() on every rank",
                    ResourceWarning, stacklevel=2)
        except Exception:
            pass


def _destroy_all_symmetric() -> None:
    """Finalize hook: destroy registry workspaces, then every live allocation, in creation order."""
    _DEFAULT_REGISTRIES["nvshmem"].destroy_all()
    with _LIVE_LOCK:
        live = sorted(_LIVE_SYMMETRIC.items())
    for _, alloc in live:
        alloc.destroy()


class _WorkspaceBase:
    """A config's layout laid over an allocation (possibly shared with other configs)."""

    def __init__(self, alloc: _Allocation, layout: WorkspaceLayout) -> None:
        if layout.nbytes > alloc.nbytes:
            raise ValueError(
                f"workspace too small for this config: it requires {layout.nbytes} bytes, the "
                f"allocation has {alloc.nbytes} bytes available")
        if layout.num_ranks != alloc.num_ranks:
            raise ValueError(f"layout for {layout.num_ranks} ranks over an allocation of "
                             f"{alloc.num_ranks} ranks")
        self._alloc = alloc
        self.layout = layout
        self._views: Dict[str, torch.Tensor] = {}

    @classmethod
    def _bind(cls, alloc: _Allocation, layout: WorkspaceLayout):
        obj = cls.__new__(cls)
        _WorkspaceBase.__init__(obj, alloc, layout)
        return obj

    @property
    def cfg(self) -> MegaMoEConfig:
        return self.layout.cfg

    @property
    def num_ranks(self) -> int:
        return self._alloc.num_ranks

    @property
    def rank(self) -> int:
        return self._alloc.rank

    @property
    def nbytes(self) -> int:
        """Bytes of the (possibly shared) allocation; >= layout.nbytes."""
        return self._alloc.nbytes

    @property
    def is_destroyed(self) -> bool:
        return self._alloc.destroyed

    @property
    def buffer(self) -> torch.Tensor:
        """The whole allocation as uint8 [nbytes]."""
        self._check_alive()
        return self._alloc.buffer

    def fits(self, cfg: MegaMoEConfig) -> bool:
        return workspace_nbytes(cfg, self.num_ranks) <= self.nbytes

    def with_config(self, cfg: MegaMoEConfig):
        """A handle laying `cfg`'s layout over this allocation (ValueError when it does not fit)."""
        return type(self)._bind(self._alloc, workspace_layout(cfg, self.num_ranks))

    def shares_allocation(self, other: "_WorkspaceBase") -> bool:
        return self._alloc is other._alloc

    def _check_alive(self) -> None:
        if self._alloc.destroyed:
            self._views.clear()
            raise RuntimeError("workspace already destroyed")

    def view(self, name: str) -> torch.Tensor:
        """This rank's slot `name` as a typed tensor (cached; aliases the allocation)."""
        self._check_alive()
        v = self._views.get(name)
        if v is None:
            v = _slice_view(self._alloc.buffer, self.layout.slot(name))
            self._views[name] = v
        return v

    def views(self) -> Dict[str, torch.Tensor]:
        return {name: self.view(name) for name in self.layout.names}

    def destroy(self) -> None:
        """Free the allocation (shared with every handle of other configs); idempotent."""
        self._views.clear()
        self._alloc.destroy()

    def __repr__(self) -> str:
        state = "destroyed" if self.is_destroyed else f"{self.nbytes} bytes"
        return (f"{type(self).__name__}(rank {self.rank}/{self.num_ranks}, layout "
                f"{self.layout.nbytes} bytes, allocation {state})")


class CPUWorkspace(_WorkspaceBase):
    """The workspace slots as plain CPU tensors: one zeroed torch.uint8 buffer, sliced.

    Args:
        cfg: the config whose layout the views follow.
        num_ranks: world size the layout is computed for.
        nbytes: allocation size (default: exactly the layout's); larger to fit several configs.
    """

    def __init__(self, cfg: MegaMoEConfig, num_ranks: int, *, nbytes: Optional[int] = None) -> None:
        layout = workspace_layout(cfg, num_ranks)
        super().__init__(_CPUAllocation(max(layout.nbytes, int(nbytes or 0)), num_ranks), layout)


class SymmetricWorkspace(_WorkspaceBase):
    """The workspace over one NVSHMEM symmetric allocation (collective to create and destroy).

    Args:
        cfg: the config whose layout the views follow.
        group: WORLD-spanning process group, or None (see `bootstrap`).
        nbytes: allocation size (default: the layout's); larger to fit several configs.
        device: CUDA device, None for the current one.

    Attributes:
        peer_bases: int64 [R] on the device: every rank's allocation base as seen from this rank
            (nvshmem_ptr), 0 for a rank with no load/store path; entry `rank` is this rank's own
            base. Kernels add `layout[name].offset` to reach a slot on a peer.
    """

    def __init__(self, cfg: MegaMoEConfig, group=None, *, nbytes: Optional[int] = None,
                 device=None) -> None:
        # Bootstrap first: it gives the clear "no CUDA" error before anything else.
        if not torch.cuda.is_available():
            bootstrap.ensure_initialized(group)  # raises RuntimeError with the explanation
        num_ranks = _group_size(group)
        layout = workspace_layout(cfg, num_ranks)
        alloc = _NvshmemAllocation(max(layout.nbytes, int(nbytes or 0)), group, device)
        super().__init__(alloc, layout)

    @property
    def group(self):
        return self._alloc.group

    @property
    def device(self) -> torch.device:
        return self._alloc.device

    @property
    def peer_bases(self) -> torch.Tensor:
        self._check_alive()
        return self._alloc.peer_bases

    @property
    def base_ptr(self) -> int:
        """This rank's allocation base address."""
        return self.buffer.data_ptr()

    def peer_view(self, name: str, rank: int) -> torch.Tensor:
        """Rank `rank`'s slot `name`, mapped into this process (loads/stores go over NVLink)."""
        self._check_alive()
        if rank == self.rank:
            return self.view(name)
        key = f"{name}@{rank}"
        v = self._views.get(key)
        if v is None:
            v = _slice_view(self._alloc.peer_buffer(rank), self.layout.slot(name))
            self._views[key] = v
        return v

    def barrier(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Stream-ordered barrier over the group (nvshmem barrier_all on `stream`, default the
        current stream): work after it on the stream sees every rank's work before it. Falls back
        to a host-blocking device sync + torch.distributed barrier when nvshmem4py has no
        stream-ordered barrier."""
        self._check_alive()
        self._alloc.barrier(stream)


# ------------------------------------------------------------------------------------------------
# Sharing: one allocation per (backend, group)
# ------------------------------------------------------------------------------------------------
def _group_size(group) -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    if group is not None:
        raise RuntimeError("a process group was given but torch.distributed is not initialised")
    return 1


def _group_key(group):
    import torch.distributed as dist
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


@dataclasses.dataclass
class _Entry:
    group: object
    reserved_nbytes: int = 0
    first: Optional[_WorkspaceBase] = None
    handles: Dict[MegaMoEConfig, _WorkspaceBase] = dataclasses.field(default_factory=dict)

    def live(self) -> Optional[_WorkspaceBase]:
        if self.first is not None and self.first.is_destroyed:
            self.first = None
            self.handles.clear()
        return self.first


class WorkspaceRegistry:
    """One shared workspace per process group (`backend` "nvshmem" or "cpu").

    The module-level `get_workspace` / `reserve` / `destroy_workspace` use one default registry per
    backend; hold your own instance to keep workspaces apart.
    """

    BACKENDS = ("nvshmem", "cpu")

    def __init__(self, backend: str = "nvshmem") -> None:
        if backend not in self.BACKENDS:
            raise ValueError(f"WorkspaceRegistry: backend must be one of {self.BACKENDS}, got {backend!r}")
        self.backend = backend
        self._entries: Dict[object, _Entry] = {}
        self._lock = threading.RLock()

    def _entry(self, group) -> _Entry:
        key = _group_key(group)
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry(group=group)
        return e

    def reserve(self, cfgs: Iterable[MegaMoEConfig], group=None) -> int:
        """Size the group's workspace for the largest of `cfgs` before it is created.

        Returns the reserved byte count. After creation it only checks the configs fit (ValueError
        with both sizes when they do not: destroy_workspace(group) first to re-create it).
        """
        with self._lock:
            num_ranks = _group_size(group)
            need = max_workspace_nbytes(cfgs, num_ranks)
            e = self._entry(group)
            first = e.live()
            if first is not None:
                if need > first.nbytes:
                    raise ValueError(
                        f"reserve: the shared workspace of this group already exists with "
                        f"{first.nbytes} bytes available, but these configs require {need} bytes; "
                        f"call reserve() before the first get_workspace(), or destroy_workspace() "
                        f"(collective) to re-create it")
                return first.nbytes
            e.reserved_nbytes = max(e.reserved_nbytes, need)
            return e.reserved_nbytes

    def get(self, cfg: MegaMoEConfig, group=None, *, device=None) -> _WorkspaceBase:
        """The group's shared workspace laid out for `cfg` (creates it on first use: collective)."""
        with self._lock:
            e = self._entry(group)
            first = e.live()
            if first is None:
                num_ranks = _group_size(group)
                need = max(workspace_nbytes(cfg, num_ranks), e.reserved_nbytes)
                if self.backend == "cpu":
                    ws: _WorkspaceBase = CPUWorkspace(cfg, num_ranks, nbytes=need)
                else:
                    ws = SymmetricWorkspace(cfg, group, nbytes=need, device=device)
                e.first = ws
                e.handles[cfg] = ws
                return ws
            ws = e.handles.get(cfg)
            if ws is None:
                need = workspace_nbytes(cfg, first.num_ranks)
                if need > first.nbytes:
                    raise ValueError(
                        f"get_workspace: this config requires {need} bytes but the shared "
                        f"workspace of this group has {first.nbytes} bytes available (sized by "
                        f"the first config); call reserve([all configs], group) before the first "
                        f"get_workspace(), or destroy_workspace(group) (collective) and re-create")
                ws = first.with_config(cfg)
                e.handles[cfg] = ws
            return ws

    def destroy(self, group=None) -> None:
        """Destroy the group's shared workspace (collective) and forget its reservation."""
        with self._lock:
            e = self._entries.pop(_group_key(group), None)
            if e is not None and e.first is not None:
                e.first.destroy()

    def destroy_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            if e.first is not None:
                e.first.destroy()


_DEFAULT_REGISTRIES = {b: WorkspaceRegistry(b) for b in WorkspaceRegistry.BACKENDS}


def get_workspace(cfg: MegaMoEConfig, group=None, *, backend: str = "nvshmem", device=None):
    """The shared workspace of `group` laid out for `cfg` (`SymmetricWorkspace`, or `CPUWorkspace`
    with backend="cpu"). The first call creates it (collective), sized by `cfg` or by `reserve`."""
    return _registry(backend).get(cfg, group, device=device)


def reserve(cfgs: Iterable[MegaMoEConfig], group=None, *, backend: str = "nvshmem") -> int:
    """Size `group`'s shared workspace for the largest of `cfgs` (call before the first
    get_workspace). Returns the reserved bytes."""
    return _registry(backend).reserve(cfgs, group)


def destroy_workspace(group=None, *, backend: str = "nvshmem") -> None:
    """Destroy `group`'s shared workspace (collective for "nvshmem"); no-op when there is none."""
    _registry(backend).destroy(group)


def destroy_all_workspaces(backend: Optional[str] = None) -> None:
    """Destroy every shared workspace of `backend` (both backends when None)."""
    for b in ([backend] if backend is not None else list(_DEFAULT_REGISTRIES)):
        _registry(b).destroy_all()


def _registry(backend: str) -> WorkspaceRegistry:
    r = _DEFAULT_REGISTRIES.get(backend)
    if r is None:
        raise ValueError(f"backend must be one of {tuple(_DEFAULT_REGISTRIES)}, got {backend!r}")
    return r


# ------------------------------------------------------------------------------------------------
# Local scratch shared by layers (not symmetric: never read by a peer)
# ------------------------------------------------------------------------------------------------
_SCRATCH: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_SCRATCH_LOCK = threading.Lock()


def shared_scratch(name: str, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A local device buffer that every layer asking for the same (name, shape, dtype, device)
    shares, as they share the symmetric workspace: layers run one after another on a stream, and
    what they keep here (e.g. the FP8 mainloop's rebased x and h) lives for one forward only.
    The buffer is freed when no layer holds it any more. Contents are undefined on return.

    Example: 58 MoE layers of one config on EP8 at T_max 4096 hold one rebased h ([P, I] E4M3,
    ~0.5 GB) between them, not 58.
    """
    key = (str(name), tuple(int(s) for s in shape), dtype, str(torch.device(device)))
    with _SCRATCH_LOCK:
        t = _SCRATCH.get(key)
        if t is None:
            t = torch.empty(key[1], dtype=dtype, device=device)
            _SCRATCH[key] = t
        return t
