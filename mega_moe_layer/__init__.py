"""mega_moe_layer: an expert-parallel Mixture-of-Experts layer for PyTorch.

Import direction (one way only): `layer.py` may use `comm/`, `kernels/`, `formats.py`, `stats.py`
and `config.py`; `kernels/` never imports `comm/` or `layer.py`; `comm/` never imports `kernels/`.
"""
from .config import MegaMoEConfig
from . import kernels
from .formats import QuantizedWeight, quantize_weight, dequantize_weight
from .layer import MegaMoE, MegaMoEExperts, SharedExpert, TopKRouter
from .stats import ExpertLoadStats, dump_stats, load_stats

__version__ = "0.1.0"
__all__ = ["MegaMoEConfig", "MegaMoEExperts", "TopKRouter", "MegaMoE", "SharedExpert",
           "QuantizedWeight", "quantize_weight", "dequantize_weight", "ExpertLoadStats",
           "dump_stats", "load_stats", "kernels", "__version__"]
