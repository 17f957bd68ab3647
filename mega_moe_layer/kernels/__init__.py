"""Kernels. `reference` is plain PyTorch; the Triton kernels are private, their wrappers public.

Import rule: `kernels/` never imports `comm/` or `layer.py`.
"""
from . import reference  # noqa: F401
from .pre_dispatch import mega_moe_pre_dispatch  # noqa: F401
