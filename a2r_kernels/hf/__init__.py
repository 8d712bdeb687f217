"""Run unmodified ``transformers`` causal LMs over a :class:`~a2r_kernels.TreeKVCache`.

Llama-, Qwen2- and Qwen3-style models keep their own modules (embeddings, RoPE, q/k norms,
projections, MLPs); only the KV storage and the attention are ours:

- :mod:`a2r_kernels.hf.attention`: the attention function registered under
  :data:`ATTN_IMPLEMENTATION` (``"a2r_tree"``) in ``transformers.AttentionInterface`` and
  :class:`HFTreeCacheAdapter`, the ``transformers.Cache`` that writes K/V into the tree cache,
  both reading one :class:`ForwardContext` per forward;
- :mod:`a2r_kernels.hf.decoder`: :class:`TreeDecoder`, the sequence API (prefill, fork, decode
  steps planned once and run per layer through a :class:`~a2r_kernels.TreeAttentionWrapper`);
- :mod:`a2r_kernels.hf.graphs`: :class:`DecodeGraphRunner`, decode steps over fixed buffers
  padded to batch buckets, replayed as CUDA graphs.

Importing this package registers ``"a2r_tree"``: outside a decoder's forward it is transformers'
SDPA attention, so ``model.generate`` keeps working on such a model.

Example::

    import a2r_kernels.hf as akhf
    dec = akhf.TreeDecoder(model, num_blocks=64)
    root, logits = dec.prefill(input_ids)               # [1, P] -> logits [1, V] (fp32)
    kids = dec.fork(root, 4)                            # 4 branches share the prompt's blocks
    logits = dec.step(kids, torch.tensor([5, 9, 2, 7])) # [4, V]: one batch, tree attention
"""

from .attention import (ATTN_IMPLEMENTATION, ForwardContext, HFTreeCacheAdapter, register,
                        tree_attention_forward)
from .decoder import TreeDecoder
from .graphs import DecodeGraphRunner, batch_bucket

__all__ = ["ATTN_IMPLEMENTATION", "DecodeGraphRunner", "ForwardContext", "HFTreeCacheAdapter",
           "TreeDecoder", "batch_bucket", "register", "tree_attention_forward"]

register()
