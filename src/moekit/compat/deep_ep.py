"""Drop-in for DeepEP's v1 module: ``import moekit.compat.deep_ep as deep_ep``.

``Buffer``, ``Config`` and ``EventOverlap`` take DeepEP v1's arguments, in its order, and return its
tuples (moekit's named tuples unpack the same way); ``handle[0]`` of a dispatch is the exact
``rank_prefix_matrix``.
"""

import torch

from moekit.ep import Buffer, Config, EventOverlap

topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]
