"""Adapters that put `MegaMoE` into other libraries' model definitions.

`mega_moe_layer.integrations.transformers`: swap the sparse-MoE blocks of a Hugging Face
transformers model (DeepSeek-V2/V3, GLM-4.5/4.6, Qwen2/Qwen3-MoE, OLMoE, Mixtral) for `MegaMoE` and read per-layer expert
counts. The `transformers` package itself is never imported here (blocks are recognised by class
name), and `import mega_moe_layer` does not import this subpackage.
"""
from .transformers import (SUPPORTED_BLOCKS, UNSUPPORTED_BLOCKS, TransformersMegaMoE, convert_block, expert_counts,
                           find_moe_blocks, global_expert_counts, replace_moe_blocks)

__all__ = ["SUPPORTED_BLOCKS", "UNSUPPORTED_BLOCKS", "TransformersMegaMoE", "convert_block", "expert_counts",
           "find_moe_blocks", "global_expert_counts", "replace_moe_blocks"]
