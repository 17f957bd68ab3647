"""NVSHMEM bootstrap: initialise nvshmem4py once per process from a torch process group.

How it works (every rank calls `ensure_initialized` with the same arguments):

1. The CUDA device is chosen (`device` argument, else `torch.cuda.current_device()`: call
   `torch.cuda.set_device(local_rank)` first, as usual under torchrun), made current for torch and
   bound through cuda-python (`cuda.core.Device(index).set_current()`; the module is `cuda.core`
   in cuda-python >= 0.3 / 1.x and `cuda.core.experimental` before).
2. Group rank 0 creates an NVSHMEM unique id (`nvshmem.core.get_unique_id()`); its raw bytes are
   broadcast over the group as a uint8 tensor: a CUDA tensor for an NCCL group, a CPU tensor for a
   gloo group (or any group whose backend string mentions gloo).
3. `nvshmem.core.init(device=..., uid=..., rank=group rank, nranks=group size,
   initializer_method="uid")`. NVSHMEM PE numbers are therefore the group ranks.
4. An `atexit` handler finalises NVSHMEM (after destroying the package's workspaces) if the user did
   not call `finalize()` first.

Environment (the one place the package touches NVSHMEM's environment, DESIGN "GPU path"):

* `NVSHMEM_SYMMETRIC_SIZE`, the symmetric heap per PE, is read by NVSHMEM at `init` and cannot grow
  past what was reserved. It is set right before `init` to `required_heap_bytes(symmetric_size)`
  (the workspace bytes plus headroom for NVSHMEM's own symmetric objects, at least NVSHMEM's 1 GiB
  default, rounded up to 512 MiB), or kept when the user already set a larger value, and restored
  to its previous value right after `init`. Size the heap for the largest workspace of the job:
  `workspace.reserve(cfgs)` before the first workspace does this.
* `NVSHMEM_DISABLE_NVLS=1` is set unless the user set it: we never use NVLink multicast (NVLS),
  and its setup is a known source of init failures on machines where multicast objects are not
  available.

Only groups spanning WORLD (all ranks of the job, in WORLD order) are supported for now: NVSHMEM is
initialised once per process and fixes its PE numbering at `init`; an expert-parallel group that is
a strict subset of WORLD would need an NVSHMEM team (`team_split_strided`) whose team-relative PE
numbers every kernel and the peer table translate, which is not implemented. Any WORLD-spanning
group (the default group, or a separate NCCL/gloo group over the same ranks) maps to the same
NVSHMEM world, so calling again with another such group is a no-op.

# NOTE: NVSHMEM is a per-process library, so the bootstrap state is necessarily process-global
# (`_STATE`); everything else (workspaces, statistics) lives on objects.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import re
import sys
import threading
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "NvshmemContext",
    "ensure_initialized",
    "finalize",
    "is_initialized",
    "get_context",
    "required_heap_bytes",
    "register_finalize_hook",
    "import_cuda_core_device",
    "NVSHMEM_DEFAULT_HEAP_BYTES",
]

#: NVSHMEM's default symmetric heap (NVSHMEM_SYMMETRIC_SIZE default, 1 GiB). Never set less.
NVSHMEM_DEFAULT_HEAP_BYTES = 1 << 30
#: Heap granularity we round to (NVSHMEM's default CUDA VMM granularity, 512 MiB).
HEAP_GRANULARITY_BYTES = 512 << 20
#: Headroom for NVSHMEM's own symmetric objects (team pSync arrays, collective scratch, signal
#: words) and for allocator alignment: max(256 MiB, 1/8 of the workspace).
HEAP_HEADROOM_MIN_BYTES = 256 << 20
HEAP_HEADROOM_FRACTION = 8

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)")
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclasses.dataclass(frozen=True)
class NvshmemContext:
    """What the bootstrap set up (one per process).

    Attributes:
        rank: this process's PE (= its rank in the WORLD-spanning group).
        num_ranks: number of PEs (= group size = WORLD size).
        device_index: CUDA device NVSHMEM is bound to.
        heap_bytes: symmetric heap size NVSHMEM was initialised with (None when NVSHMEM had
            already been initialised outside this package, so the size is unknown).
        backend: torch.distributed backend used for the unique-id broadcast ("none" for 1 rank
            without torch.distributed).
        owned: True when this package initialised NVSHMEM (and will finalise it).
    """

    rank: int
    num_ranks: int
    device_index: int
    heap_bytes: Optional[int]
    backend: str
    owned: bool = True


_LOCK = threading.RLock()
_STATE: Optional[NvshmemContext] = None
_ATEXIT_REGISTERED = False
_FINALIZE_HOOKS: List[Callable[[], None]] = []


# ------------------------------------------------------------------------------------------------
# Pure helpers (CPU-testable)
# ------------------------------------------------------------------------------------------------
def required_heap_bytes(workspace_nbytes: int) -> int:
    """Symmetric heap size to request for a workspace of `workspace_nbytes` bytes.

    `max(1 GiB, nbytes + max(256 MiB, nbytes / 8))`, rounded up to a multiple of 512 MiB.
    """
    if not isinstance(workspace_nbytes, int) or workspace_nbytes < 0:
        raise ValueError(f"workspace_nbytes: expected a non-negative int, got {workspace_nbytes!r}")
    headroom = max(HEAP_HEADROOM_MIN_BYTES, workspace_nbytes // HEAP_HEADROOM_FRACTION)
    need = max(NVSHMEM_DEFAULT_HEAP_BYTES, workspace_nbytes + headroom)
    return -(-need // HEAP_GRANULARITY_BYTES) * HEAP_GRANULARITY_BYTES


def parse_nvshmem_size(text: Optional[str]) -> Optional[int]:
    """Parse an NVSHMEM size string ("1073741824", "2G", "3.1m", ".5g"); None when unparsable.

    Follows NVSHMEM's rule: one optional k/m/g/t suffix (powers of 1024), the rest ignored.
    """
    if text is None:
        return None
    m = _SIZE_RE.match(text)
    if not m:
        return None
    value = float(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
    return int(-(-value // 1))


def validate_group_ranks(group_ranks: Tuple[int, ...], world_size: int) -> None:
    """Raise ValueError unless `group_ranks` is exactly WORLD, in WORLD order."""
    if tuple(group_ranks) != tuple(range(world_size)):
        shown = list(group_ranks) if len(group_ranks) <= 16 else f"{len(group_ranks)} ranks"
        raise ValueError(
            f"mega_moe_layer NVSHMEM bootstrap: the process group has global ranks {shown} but "
            f"WORLD has {world_size} ranks. Only groups spanning WORLD (all ranks, in WORLD order) "
            f"are supported for now: NVSHMEM is initialised once per process and fixes its PE "
            f"numbering at init; a sub-group would need an NVSHMEM team with team-relative PE "
            f"numbers in every kernel and in the peer table, which is not implemented. Use "
            f"group=None (WORLD) for expert parallelism, or backend='torch' for sub-groups.")


def import_cuda_core_device():
    """Return cuda-python's `Device` class: `cuda.core` (>= 0.3 / 1.x) or `cuda.core.experimental`."""
    try:
        from cuda.core import Device  # type: ignore[import-not-found]
        return Device
    except ImportError:
        pass
    try:
        from cuda.core.experimental import Device  # type: ignore[import-not-found]
        return Device
    except ImportError as e:
        raise RuntimeError(
            "mega_moe_layer NVSHMEM bootstrap needs cuda-python's cuda.core (pip install "
            "cuda-python); neither cuda.core.Device nor cuda.core.experimental.Device imports") from e


def _import_nvshmem():
    try:
        import nvshmem.core as nvshmem  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a missing shared library
        raise RuntimeError(
            "mega_moe_layer NVSHMEM bootstrap needs nvshmem4py (pip install nvshmem4py-cu13 or "
            f"-cu12): `import nvshmem.core` failed: {e!r}") from e
    return nvshmem


def _resolve_group(group) -> Tuple[Optional[object], int, int, str]:
    """(group or None, rank, num_ranks, backend) after checking the group spans WORLD."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("mega_moe_layer NVSHMEM bootstrap: a process group was given but "
                               "torch.distributed is not initialised")
        return None, 0, 1, "none"
    if group is None:
        group = dist.group.WORLD
    world = dist.get_world_size()
    ranks = tuple(dist.get_process_group_ranks(group))
    validate_group_ranks(ranks, world)
    return group, dist.get_rank(), world, str(dist.get_backend(group))


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"mega_moe_layer NVSHMEM bootstrap: expected a CUDA device, got {device!r}")
    return torch.cuda.current_device() if d.index is None else d.index


def _uid_nbytes(uid) -> int:
    data = getattr(uid, "_data", None)
    return int(data.nbytes) if data is not None else 128


def exchange_unique_id(group, rank: int, num_ranks: int, backend: str,
                       device_index: Optional[int] = None):
    """Create the NVSHMEM unique id on rank 0 and broadcast its bytes over `group`.

    Returns the `nvshmem.core.UniqueID` object on every rank. The bytes travel as a uint8 tensor:
    on CUDA (`device_index`) for an NCCL-only group, on the CPU when the backend is gloo (or a
    mixed "cpu:gloo,cuda:nccl" backend). Works on the CPU for gloo groups (no GPU needed).
    """
    nvshmem = _import_nvshmem()
    uid = nvshmem.get_unique_id(empty=(rank != 0))
    nbytes = _uid_nbytes(uid)
    if num_ranks > 1:
        use_cuda = "gloo" not in backend and "nccl" in backend
        dev = torch.device("cuda", device_index if device_index is not None
                           else torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if rank == 0:
            payload = torch.frombuffer(bytearray(ctypes.string_at(uid.ptr, nbytes)), dtype=torch.uint8)
        else:
            payload = torch.zeros(nbytes, dtype=torch.uint8)
        payload = payload.to(dev)
        # The group spans WORLD in WORLD order (checked), so group rank 0 is global rank 0.
        dist.broadcast(payload, src=0, group=group)
        if rank != 0:
            raw = bytes(payload.cpu().numpy().tobytes())
            ctypes.memmove(uid.ptr, raw, nbytes)
    return uid


# ------------------------------------------------------------------------------------------------
# Init / finalize
# ------------------------------------------------------------------------------------------------
def is_initialized() -> bool:
    """True while NVSHMEM is initialised through this module (or adopted from outside)."""
    return _STATE is not None


def get_context() -> Optional[NvshmemContext]:
    """The current `NvshmemContext`, or None before `ensure_initialized` / after `finalize`."""
    return _STATE


def register_finalize_hook(fn: Callable[[], None]) -> None:
    """Run `fn()` (collectively, on every rank) at the start of `finalize()`; registered once."""
    with _LOCK:
        if fn not in _FINALIZE_HOOKS:
            _FINALIZE_HOOKS.append(fn)


def _externally_initialized(nvshmem) -> bool:
    try:
        from nvshmem.core._internal_tracking import InternalInitStatus, _is_initialized
        return _is_initialized["status"] == InternalInitStatus.INITIALIZED
    except Exception:
        return False


def ensure_initialized(group=None, *, symmetric_size: int = 0, device=None) -> NvshmemContext:
    """Initialise NVSHMEM once for this process over `group` (collective on first call).

    Args:
        group: a torch.distributed process group spanning WORLD, or None (WORLD when
            torch.distributed is initialised, else a single process).
        symmetric_size: bytes of symmetric memory the caller is about to allocate; sizes the
            NVSHMEM heap on the first call (`required_heap_bytes`). Later calls cannot grow the
            heap: a larger request warns (NVSHMEM may still fit it) and the allocation reports
            failure if it does not.
        device: CUDA device (int, "cuda:N" or torch.device) or None for the current device.

    Returns:
        The process's `NvshmemContext`.

    Raises:
        RuntimeError: no CUDA device, nvshmem4py / cuda-python missing, NVSHMEM init failure, or
            a different device than the one NVSHMEM is bound to.
        ValueError: a group that does not span WORLD.
    """
    global _STATE, _ATEXIT_REGISTERED
    if not torch.cuda.is_available():
        raise RuntimeError(
            "mega_moe_layer NVSHMEM bootstrap needs a CUDA GPU, but torch.cuda.is_available() is "
            "False (no GPU, no driver, or a CPU-only torch build). On the CPU use the torch "
            "backend (backend='torch', CPUWorkspace).")
    with _LOCK:
        group, rank, num_ranks, backend = _resolve_group(group)
        dev_index = _device_index(device)
        if _STATE is not None:
            if _STATE.num_ranks != num_ranks or _STATE.rank != rank:
                raise ValueError(
                    f"mega_moe_layer NVSHMEM bootstrap: already initialised as PE {_STATE.rank} of "
                    f"{_STATE.num_ranks}, but this group makes this process rank {rank} of "
                    f"{num_ranks}. Only WORLD-spanning groups are supported for now.")
            if device is not None and dev_index != _STATE.device_index:
                raise RuntimeError(
                    f"mega_moe_layer NVSHMEM bootstrap: NVSHMEM is bound to cuda:{_STATE.device_index}"
                    f", cannot use cuda:{dev_index} in the same process")
            need = required_heap_bytes(int(symmetric_size))
            if _STATE.heap_bytes is not None and need > _STATE.heap_bytes:
                warnings.warn(
                    f"mega_moe_layer: a symmetric allocation of {symmetric_size} bytes needs a "
                    f"{need}-byte NVSHMEM heap but NVSHMEM was initialised with "
                    f"{_STATE.heap_bytes} bytes; it may not fit. Size the heap for the largest "
                    f"config before the first workspace (workspace.reserve(cfgs)).",
                    RuntimeWarning, stacklevel=2)
            return _STATE

        nvshmem = _import_nvshmem()
        Device = import_cuda_core_device()
        torch.cuda.set_device(dev_index)
        cu_dev = Device(dev_index)
        cu_dev.set_current()

        if _externally_initialized(nvshmem):
            # Someone else initialised NVSHMEM in this process: adopt it when it matches.
            my_pe, n_pes = int(nvshmem.my_pe()), int(nvshmem.n_pes())
            if (my_pe, n_pes) != (rank, num_ranks):
                raise RuntimeError(
                    f"mega_moe_layer NVSHMEM bootstrap: NVSHMEM was initialised outside the package "
                    f"as PE {my_pe} of {n_pes}, but the group makes this process rank {rank} of "
                    f"{num_ranks}")
            _STATE = NvshmemContext(rank, num_ranks, dev_index, None, backend, owned=False)
            return _STATE

        uid = exchange_unique_id(group, rank, num_ranks, backend, dev_index)

        heap = required_heap_bytes(int(symmetric_size))
        prev_size = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
        user_size = parse_nvshmem_size(prev_size)
        if user_size is not None and user_size > heap:
            heap = user_size
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(heap)
        try:
            nvshmem.init(device=cu_dev, uid=uid, rank=rank, nranks=num_ranks,
                         initializer_method="uid")
        except Exception as e:
            raise RuntimeError(
                f"mega_moe_layer NVSHMEM bootstrap: nvshmem.core.init failed on rank {rank} of "
                f"{num_ranks} (cuda:{dev_index}, heap {heap} bytes): {e!r}. Set NVSHMEM_DEBUG=INFO "
                f"for NVSHMEM's own log.") from e
        finally:
            if prev_size is None:
                os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
            else:
                os.environ["NVSHMEM_SYMMETRIC_SIZE"] = prev_size
        my_pe, n_pes = int(nvshmem.my_pe()), int(nvshmem.n_pes())
        if (my_pe, n_pes) != (rank, num_ranks):
            raise RuntimeError(f"mega_moe_layer NVSHMEM bootstrap: NVSHMEM reports PE {my_pe} of "
                               f"{n_pes}, expected {rank} of {num_ranks}")
        _STATE = NvshmemContext(rank, num_ranks, dev_index, heap, backend, owned=True)
        if not _ATEXIT_REGISTERED:
            atexit.register(_atexit_finalize)
            _ATEXIT_REGISTERED = True
        return _STATE


def finalize() -> None:
    """Destroy the package's symmetric workspaces and finalise NVSHMEM (collective; idempotent).

    Every rank must call it (NVSHMEM's free and finalize synchronise all PEs). A no-op when
    NVSHMEM is not initialised. NVSHMEM initialised outside the package is left running.
    """
    global _STATE
    with _LOCK:
        if _STATE is None:
            return
        state = _STATE
        errors: List[BaseException] = []
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize(state.device_index)
        except Exception as e:  # a sticky CUDA error must not stop the teardown
            errors.append(e)
        for hook in list(_FINALIZE_HOOKS):
            try:
                hook()
            except Exception as e:
                errors.append(e)
        try:
            if state.owned:
                _import_nvshmem().finalize()
        finally:
            _STATE = None
        if errors:
            raise RuntimeError(f"mega_moe_layer NVSHMEM finalize: NVSHMEM was finalised, but "
                               f"tearing down workspaces failed: {errors!r}") from errors[0]


def _atexit_finalize() -> None:
    # Never raise at interpreter exit: report and carry on.
    if _STATE is None:
        return
    try:
        finalize()
    except BaseException as e:  # noqa: BLE001
        try:
            sys.stderr.write(f"mega_moe_layer: NVSHMEM finalize at exit failed: {e!r}\n")
        except Exception:
            pass
