"""The one interface every backend of `MegaMoEExperts` implements (`torch_backend.TorchBackend`,
`nvshmem_backend.NvshmemForward`).

A backend is built once per layer with everything that does not change between calls (config,
group, device, the layer's `ExpertLoadStats` and int32 [1] error counter, which it updates in
place); `MegaMoEExperts` then hands it the quantised weights once per weight load and the inputs of
each call. Inputs reach `forward` already checked for type, dtype, shape, device and layout (host
metadata only); checking the expert ids' values is the backend's job (`validate`).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .formats import QuantizedWeight

__all__ = ["ExpertsBackend"]


@runtime_checkable
class ExpertsBackend(Protocol):
    """What `MegaMoEExperts` needs from a backend.

    Attributes:
        name: "torch" | "nvshmem".
        validate: True: an expert id outside [-1, E) raises ValueError naming the first bad row
            before `forward` returns; False: such pairs are dropped and counted in the error
            counter (no host synchronisation on the GPU). The module sets it.
        needs_loaded_weights: after `prepare_weights`, whether the backend still reads the
            loaded weights on their device (False: it keeps its own form of them, e.g. the Hopper
            FP8 mainloop's operands, and the module moves its copy to the host).
    """

    name: str
    validate: bool
    needs_loaded_weights: bool

    def prepare_weights(self, qw13: QuantizedWeight, qw2: QuantizedWeight) -> None:
        """Take this rank's quantised weights (L1 [E_local, 2I, H], L2 [E_local, H, I]); called once
        per weight load, before any forward."""
        ...

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x bf16 [T, H], topk_idx int32/int64 [T, K], topk_weights float32 [T, K] -> y bf16 [T, H]
        (a tensor the caller owns); updates the statistics and the error counter in place."""
        ...

    def check_errors(self) -> None:
        """Raise RuntimeError for a failure the backend recorded on its own (e.g. a GPU spin-wait
        timeout); the module checks the shared error counter itself."""
        ...
