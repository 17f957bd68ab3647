"""Communication: process-group bootstrap, NVSHMEM symmetric workspace, CPU workspace.

Import rule: `comm/` never imports `kernels/` or `layer.py`.

- `bootstrap`: NVSHMEM initialised once per process from a WORLD-spanning torch process group
  (`ensure_initialized`, `finalize`); nvshmem4py is imported lazily, so importing this package
  works without a GPU.
- `workspace`: the slot layout as a pure function of (config, world size) (`workspace_layout`,
  `workspace_nbytes`), the NVSHMEM-backed `SymmetricWorkspace`, the CPU `CPUWorkspace`, and the
  per-group sharing (`get_workspace`, `reserve`, `destroy_workspace`).
"""
from . import bootstrap, workspace
from .bootstrap import NvshmemContext, ensure_initialized, finalize, get_context, is_initialized
from .workspace import (
    CPUWorkspace,
    Slot,
    SymmetricWorkspace,
    WorkspaceLayout,
    WorkspaceRegistry,
    destroy_all_workspaces,
    destroy_workspace,
    get_workspace,
    reserve,
    workspace_layout,
    workspace_nbytes,
)

__all__ = [
    "bootstrap",
    "workspace",
    "NvshmemContext",
    "ensure_initialized",
    "finalize",
    "get_context",
    "is_initialized",
    "Slot",
    "WorkspaceLayout",
    "workspace_layout",
    "workspace_nbytes",
    "SymmetricWorkspace",
    "CPUWorkspace",
    "WorkspaceRegistry",
    "get_workspace",
    "reserve",
    "destroy_workspace",
    "destroy_all_workspaces",
]
