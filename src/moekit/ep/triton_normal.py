"""The ``triton`` backend of high-throughput dispatch / combine: kernels that write rows straight
into peers' memory on a symmetric heap (NVLink on GPUs of one host; a simulated heap under
``TRITON_INTERPRET=1``).

A dispatch exchanges counts (:mod:`~moekit.ep.kernels.notify`), after which every sender knows the
final row of each of its tokens at each receiver. The rows then move in rounds through the heap
region (one round when ``num_nvl_bytes`` holds the worst case; more when it does not): each sender
writes its rows at their final offsets, each receiver copies its region into fresh outputs. Combine
does the reverse, summing in float32 in rank order; large combines send the rows back with the copy
engines (:mod:`~moekit.ep.kernels.copy_combine`), the others with kernels. Cross-rank waits are
timed; a wait that gives up is reported by :class:`~moekit.ep.kernels.sync.ErrorRecord` and raised
as ``TimeoutError``.

Host synchronisation: one read per non-cached dispatch without ``num_worst_tokens``, of the summary
the count exchange's launch builds (the counts that size the outputs, as DeepEP reads them, the
per-expert list and the input checks; :mod:`~moekit.ep.kernels.notify`); none with
``num_worst_tokens``, in combine, or in a cached dispatch with a handle of this engine (one read of
the prefix matrix for a handle made elsewhere, or a padded handle reused without padding), so those
paths can be captured in CUDA graphs. Epochs live on
the device and grow with every round, so replays of a captured graph keep the flags consistent.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist

from moekit.ep import validate as v
from moekit.ep.heap import HeapLayout, SymmetricHeap, interpreting
from moekit.ep.kernels import combine as combine_kernels, copy_combine, dispatch as dispatch_kernels
from moekit.ep.kernels.notify import exchange_counts, read_summary
from moekit.ep.kernels.sync import ErrorRecord, wait_budget
from moekit.ep.results import DispatchHandle
from moekit.ep.torch_backend import TorchDispatcher, round_up_counts
from moekit.ep.validate import CheckedActivation

# Heap bytes for rows when the Buffer asks for none (num_nvl_bytes=0, as low-latency-only users pass).
_MIN_REGION_BYTES = 1 << 20
# The most experts whose token counts ride along with the count exchange (the per-expert list then
# needs no second read of the device); with more, the list is counted from the received rows.
_MAX_COUNTED_EXPERTS = 1024
# Programs per launch under the interpreter, which runs them one after another.
_INTERPRETED_PROGRAMS = 5


def _aligned(n: int, align: int = 16) -> int:
    return (n + align - 1) // align * align


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _arrays(capacity: int, sizes: dict[str, int]) -> dict[str, int]:
    """Byte offsets of arrays of ``capacity`` rows of ``sizes[name]`` bytes, laid end to end, 16-aligned."""
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = at
        at += _aligned(capacity * size)
    return offsets


def _capacity(region_bytes: int, sizes: dict[str, int]) -> int:
    """Most rows whose arrays (see ``_arrays``) fit in ``region_bytes``."""
    return max((region_bytes - 16 * len(sizes)) // sum(sizes.values()), 0)


def _region_bytes(rows: int, sizes: dict[str, int]) -> int:
    """Fewest region bytes that hold ``rows`` rows (the inverse of ``_capacity``)."""
    return rows * sum(sizes.values()) + 16 * len(sizes)


def _received_row(words: int, num_scales: int, num_topk: int, has_weights: bool) -> dict[str, int]:
    """Region bytes per row a dispatch receives: the row's 4-byte words, its float32 scales, int64
    top-k ids, float32 top-k weights and int32 source index."""
    return {"data": words * 4, "scales": num_scales * 4, "idx": num_topk * 8,
            "weights": num_topk * 4 if has_weights else 0, "src": 4}


def _returning_rows(hidden: int, num_topk: int, num_ranks: int) -> dict[str, int]:
    """Region bytes per token of a combine: its bf16 row and weights from each peer (a token's own
    row is read in place, not staged)."""
    peers = max(num_ranks - 1, 1)
    return {"data": hidden * 2 * peers, "weights": num_topk * 4 * peers}


def one_round_nvl_bytes(num_ranks: int, num_tokens: int, hidden: int, topk: int) -> int:
    """``num_nvl_bytes`` with which a dispatch (bf16 or FP8 with its scales, top-k ids and weights)
    and a combine of ``num_tokens`` tokens per rank each run in one round: a rank may receive every
    rank's tokens. A smaller buffer splits the calls into rounds."""
    received = [_received_row(hidden // 2, 0, topk, True), _received_row(hidden // 4, hidden // 128, topk, True)]
    return max([_region_bytes(num_ranks * num_tokens, row) for row in received]
               + [_region_bytes(num_tokens, _returning_rows(hidden, topk, num_ranks))])


class TritonDispatcher:
    """High-throughput dispatch / combine over ``group`` with Triton kernels on a symmetric heap.

    Args:
        group: the expert-parallel group (every rank on one host, or interpreted CPU ranks).
        device: this rank's device.
        settings: :class:`~moekit.ep.backends.EngineSettings`; ``num_nvl_bytes`` sizes the row
            region (rounds are chunked when it is small), ``timeout_s`` limits every wait.
    """

    # A dispatch without a handle checks the range of topk_idx in its own device read (Buffer skips it).
    reads_topk_range = True

    def __init__(self, group: dist.ProcessGroup, device: torch.device, settings) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.interpret = interpreting()
        self.timeout_s = settings.timeout_s
        self.max_wait = wait_budget(self.timeout_s, self.interpret)
        r = self.num_ranks
        layout = HeapLayout()
        self.table_off = layout.add("table", (r, r + 1 + _MAX_COUNTED_EXPERTS), torch.int64)
        self.notify_off = layout.add("notify", (r,), torch.int64)
        self.flags = {name: layout.add(name, (r, dispatch_kernels.MAX_PROGRAMS), torch.int64)
                      for name in ("progress", "start", "consumed", "arrived")}
        self.region_bytes = settings.num_nvl_bytes or _MIN_REGION_BYTES
        self.region_off = layout.add("region", (self.region_bytes,), torch.uint8)
        self.heap = SymmetricHeap(group, layout.size, device)
        self.errors = ErrorRecord(device)
        # [notify exchanges done, rounds done]: on the device so that graph replays advance them.
        self.epochs = torch.zeros(2, dtype=torch.int64, device=device)
        self._notify_epoch, self._round_epoch = self.epochs[0:1], self.epochs[1:2]
        self._regions: dict[tuple, tuple[int, dict[str, int]]] = {}
        self._warned_rounds: set[str] = set()
        self.prev_programs = 0
        self.dummy = torch.zeros(16, dtype=torch.int64, device=device)
        # The epoch a combine's copies carry to the peers, and the stream they run on.
        self._copy_value = torch.zeros(1, dtype=torch.int64, device=device)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # recv_src_idx of this engine's num_worst_tokens dispatches (padded: more rows than were received),
        # by id: tensors compare elementwise, so they cannot be set members themselves.
        self._padded: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------ helpers
    def _programs(self, send_share: float) -> tuple[int, int]:
        """(senders, receivers) of a launch: the SM budget, one program per SM, ``send_share`` sending."""
        from moekit.ep.buffer import Buffer

        programs = _INTERPRETED_PROGRAMS if self.interpret else Buffer.num_sms
        senders, receivers = dispatch_kernels.split_programs(programs, send_share)
        return min(senders, dispatch_kernels.MAX_PROGRAMS), min(receivers, dispatch_kernels.MAX_PROGRAMS)

    def _combines_by_copy(self, handle: DispatchHandle, num_rounds: int, hidden: int) -> bool:
        """Whether a combine goes through the copy engines (:mod:`~moekit.ep.kernels.copy_combine`):
        where the copy sizes are known on the host, one round holds every block and, on GPUs, the
        largest rank's rows are big enough to repay the copies' host time. Every input is the same
        on every rank, so all ranks choose alike."""
        if handle.rank_prefix_host is None or num_rounds != 1:
            return False
        # The interpreter takes the copy path whenever it can, so that the CPU tests cover it.
        largest = (handle.max_tokens_per_rank or 0) * hidden * 2
        return self.interpret or largest >= copy_combine.MIN_BYTES

    def _warn_rounds(self, op: str, num_rounds: int, rows: int, sizes: dict[str, int]) -> None:
        """Warns once per op that ``num_nvl_bytes`` splits calls into rounds, and what holds one."""
        if num_rounds > 1 and op not in self._warned_rounds:
            self._warned_rounds.add(op)
            warnings.warn(f"num_nvl_bytes: {self.region_bytes} bytes split this {op} into {num_rounds} rounds, "
                          f"each of which pays the transfer's start-up again; {_region_bytes(rows, sizes)} bytes would "
                          "hold it in one", stacklevel=4)

    def _check(self) -> None:
        self.errors.check(self.timeout_s)

    def _region(self, sizes: dict[str, int], what: str) -> tuple[int, dict[str, int]]:
        """(rows the region holds, byte offset of each array), remembered per row layout."""
        key = tuple(sizes.items())
        if key not in self._regions:
            capacity = _capacity(self.region_bytes, sizes)
            if capacity < 1:
                raise ValueError(f"num_nvl_bytes: {self.region_bytes} bytes cannot hold one {what} of "
                                 f"{sum(sizes.values())} bytes; pass a larger num_nvl_bytes to Buffer")
            self._regions[key] = capacity, {k: self.region_off + v for k, v in _arrays(capacity, sizes).items()}
        return self._regions[key]

    def _common(self) -> dict:
        return dict(heap_ptrs=self.heap.ptrs, flags=self.flags,
                    rank=self.rank, max_wait=self.max_wait, error_addr=self.errors.address,
                    interpret=self.interpret, dummy=self.dummy)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: CheckedActivation, *, handle: DispatchHandle | None,
                 num_tokens_per_rank: torch.Tensor | None, is_token_in_rank: torch.Tensor | None,
                 topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None, num_experts: int | None,
                 expert_alignment: int, num_worst_tokens: int, num_tokens_per_expert: torch.Tensor | None = None):
        """Returns (recv_data, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle),
        equal to :meth:`TorchDispatcher.dispatch`'s.

        A dispatch without a handle reads the device once (none with ``num_worst_tokens``): the count
        table, this rank's tokens per destination, its received tokens per local expert (summed from
        the exchanged ``num_tokens_per_expert``) and the range of ``topk_idx`` (checked here), all
        built by the count exchange's one launch.
        """
        self._check()
        n, me = x.num_tokens, self.rank
        max_tokens = per_expert_list = prefix_host = None
        is_token_in_rank = handle.is_token_in_rank if handle is not None else is_token_in_rank
        in_rank = is_token_in_rank.contiguous().view(torch.uint8)
        if handle is not None:
            prefix = handle.rank_prefix_matrix.to(torch.int32).contiguous()
            # A handle of this engine's unpadded dispatch has exactly the real rows: no need to ask the device.
            out_rows = handle.recv_src_idx.shape[0]
            max_rows = handle.max_recv_rows
            padded = self._padded.get(id(handle.recv_src_idx)) is handle.recv_src_idx
            if max_rows is None or (padded and not num_worst_tokens):
                totals = handle.rank_prefix_matrix[-1].tolist()
                out_rows = out_rows if num_worst_tokens else totals[me]
                max_rows = max_rows if max_rows is not None else max(totals)
        else:
            r = self.num_ranks
            counted = num_tokens_per_expert if num_experts and num_experts <= _MAX_COUNTED_EXPERTS else None
            e_loc = num_experts // r if counted is not None and not num_worst_tokens else 0
            prefix, summary = exchange_counts(
                num_tokens_per_rank=num_tokens_per_rank, num_tokens=n, num_tokens_per_expert=counted,
                in_rank=in_rank, topk_idx=topk_idx, experts_per_rank=e_loc,
                summarize=not num_worst_tokens, heap_ptrs=self.heap.ptrs, table_off=self.table_off,
                flags_off=self.notify_off, epoch=self._notify_epoch, rank=me, max_wait=self.max_wait,
                error_addr=self.errors.address, interpret=self.interpret, dummy=self.dummy)
            if num_worst_tokens:
                out_rows, max_rows, max_tokens = num_worst_tokens, num_worst_tokens, n
            else:
                counts = read_summary(summary, r, e_loc)
                self._check()
                if counts.topk_range is not None:
                    v.raise_for_topk_range(*counts.topk_range, num_experts)
                rows = counts.table
                if rows[me][:-1] != counts.sent:
                    raise ValueError("num_tokens_per_rank: does not match is_token_in_rank.sum(0) on rank "
                                     f"{me} ({rows[me][:-1]} vs {counts.sent})")
                if counted is not None:
                    per_expert_list = round_up_counts(counts.received_per_expert, expert_alignment)
                prefix_host = tuple(tuple(sum(row[j] for row in rows[:i + 1]) for j in range(r)) for i in range(r))
                totals = list(prefix_host[-1])
                out_rows, max_rows, max_tokens = totals[me], max(totals), max(row[-1] for row in rows)

        words = x.data.shape[1] * x.data.element_size() // 4
        x_words = x.data.view(torch.int32) if x.data.numel() else x.data.new_empty((0, words), dtype=torch.int32)
        num_scales = x.scales.shape[1] if x.scales is not None else 0
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        outputs = {"data": torch.empty(out_rows, words, dtype=torch.int32, device=self.device),
                   "scales": torch.empty(out_rows, num_scales, dtype=torch.float32, device=self.device)
                   if x.scales is not None else None,
                   "idx": torch.empty(out_rows, num_topk, dtype=torch.int64, device=self.device)
                   if topk_idx is not None else None,
                   "weights": torch.empty(out_rows, num_topk, dtype=torch.float32, device=self.device)
                   if topk_weights is not None else None,
                   "src": torch.empty(out_rows, dtype=torch.int32, device=self.device)}
        sizes = _received_row(words, num_scales, num_topk, topk_weights is not None)
        capacity, regions = self._region(sizes, "received row")
        rows_needed = max(max_rows, out_rows)
        num_rounds = max(1, _cdiv(rows_needed, capacity))
        self._warn_rounds("dispatch", num_rounds, rows_needed, sizes)
        senders, receivers = self._programs(dispatch_kernels.DISPATCH_SEND_SHARE)
        experts_per_rank = num_experts // self.num_ranks if num_experts else 0
        addresses = {k: (t.data_ptr() if t is not None and t.numel() else 0) for k, t in outputs.items()}
        for c in range(num_rounds):
            dispatch_kernels.dispatch_round(
                x_words=x_words, scales=x.scales, topk_idx=topk_idx, topk_weights=topk_weights, in_rank=in_rank,
                prefix=prefix, outputs=addresses, regions=regions, experts_per_rank=experts_per_rank,
                lo=c * capacity, hi=(c + 1) * capacity, round_idx=c, out_rows=out_rows, epoch=self._round_epoch,
                senders=senders, receivers=receivers, prev_programs=self.prev_programs, **self._common())
            self.prev_programs = receivers
        self._round_epoch.add_(num_rounds)

        recv_data = outputs["data"].view(x.data.dtype).view(out_rows, x.hidden)
        recv_idx, recv_weights = outputs["idx"], outputs["weights"]
        if handle is None and num_worst_tokens:
            per_expert_list = []
        elif handle is None and per_expert_list is None:
            # Too many experts to carry in the count exchange: count the received rows (a device read).
            per_expert_list = TorchDispatcher._aligned_counts(recv_idx, experts_per_rank, expert_alignment)
            self._check()
        if self.interpret:
            self._check()
        new_handle = None
        if handle is None:
            new_handle = DispatchHandle(prefix, outputs["src"], is_token_in_rank, max_recv_rows=max_rows,
                                        max_tokens_per_rank=max_tokens, rank_prefix_host=prefix_host)
            if num_worst_tokens:
                self._padded[id(outputs["src"])] = outputs["src"]
        return recv_data, outputs["scales"], recv_idx, recv_weights, per_expert_list, new_handle

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None,
                biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums, in float32 and in rank order, the rows each token's ranks send back, then adds the
        biases (as :meth:`TorchDispatcher.combine`); returns (bf16 [N, H], float32 [N, K] or None)."""
        self._check()
        in_rank = handle.is_token_in_rank.contiguous().view(torch.uint8)
        num_tokens, hidden = in_rank.shape[0], x.shape[1]
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        max_tokens = handle.max_tokens_per_rank if handle.max_tokens_per_rank is not None else num_tokens
        slot = _returning_rows(hidden, num_topk, self.num_ranks)
        tokens_per_round, regions = self._region(slot, "token's returning rows")
        num_rounds = max(1, _cdiv(max_tokens, tokens_per_round))
        self._warn_rounds("combine", num_rounds, max_tokens, slot)
        x = x.contiguous()
        weights = topk_weights.contiguous() if topk_weights is not None else None
        out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        out_weights = torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device) \
            if weights is not None else None
        prefix = handle.rank_prefix_matrix.to(torch.int32).contiguous()
        biases = [b.contiguous() for b in biases]
        senders, receivers = self._programs(combine_kernels.COMBINE_SEND_SHARE)
        if self._combines_by_copy(handle, num_rounds, hidden):
            programs = min(senders + receivers, dispatch_kernels.MAX_PROGRAMS)
            copy_combine.combine_by_copy(
                x=x, topk_weights=weights, in_rank=in_rank, prefix=prefix, prefix_host=handle.rank_prefix_host,
                biases=biases, out=out, out_weights=out_weights, regions=regions, capacity=tokens_per_round,
                peer_heaps=self.heap.peers, epoch=self._round_epoch, value=self._copy_value,
                copy_stream=self._copy_stream, programs=programs, prev_programs=self.prev_programs,
                **self._common())
            self.prev_programs = programs
        else:
            x_words = x.view(torch.int32) if x.numel() else x.new_empty((0, hidden // 2), dtype=torch.int32)
            for c in range(num_rounds):
                combine_kernels.combine_round(
                    x_words=x_words, topk_weights=weights, src_idx=handle.recv_src_idx, prefix=prefix,
                    in_rank=in_rank, biases=biases, out=out, out_weights=out_weights, regions=regions,
                    tok_lo=c * tokens_per_round, tok_hi=(c + 1) * tokens_per_round, round_idx=c,
                    epoch=self._round_epoch, senders=senders, receivers=receivers, prev_programs=self.prev_programs,
                    **self._common())
                self.prev_programs = receivers
        self._round_epoch.add_(num_rounds)
        if self.interpret:
            self._check()
        return out, out_weights
