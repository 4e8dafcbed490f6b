"""Expert-parallel communication: dispatch tokens to the ranks that hold their experts, combine back.

``Buffer`` offers the high-throughput calls (``get_dispatch_layout``, ``dispatch``, ``combine``) and
the low-latency calls (``low_latency_dispatch``, ``low_latency_combine``) with DeepEP v1's arguments;
results are named tuples. See ``moekit.compat.deep_ep`` for the drop-in module.
"""

from moekit.ep.backends import available_backends
from moekit.ep.buffer import Buffer
from moekit.ep.config import Config
from moekit.ep.events import EventOverlap
from moekit.ep.layout import DispatchLayout
from moekit.ep.results import (CombineResult, DispatchHandle, DispatchResult, LowLatencyCombineResult,
                               LowLatencyDispatchResult, LowLatencyHandle)

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchLayout", "DispatchHandle", "DispatchResult",
           "CombineResult", "LowLatencyHandle", "LowLatencyDispatchResult", "LowLatencyCombineResult",
           "available_backends"]
