"""Test-session setup shared by every test file.

Without a GPU (CI), Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set
before any kernel is decorated, i.e. before `mega_moe_layer.kernels.*` is imported.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))   # `from utils import ...` in every test file
