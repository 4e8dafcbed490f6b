"""Events and the communication stream: how EP calls order themselves against the caller's work."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class EventOverlap:
    """A device event plus tensors kept alive until it is waited on (instead of ``record_stream``,
    which CUDA graphs do not allow). On a CPU the event is ``None`` and waiting does nothing.

    Args:
        event: a ``torch.cuda.Event`` recorded after the work, or ``None``.
        extra_tensors: tensors that must outlive the work the event marks.
    """

    def __init__(self, event: torch.cuda.Event | None = None,
                 extra_tensors: Sequence[torch.Tensor] | None = None) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Makes the caller's current stream wait for the event."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()


def capture_event() -> EventOverlap:
    """An event on the current stream (``None`` on a CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return EventOverlap()
    event = torch.cuda.Event()
    event.record()
    return EventOverlap(event)


class CommWork:
    """What one EP call ran on the communication stream: its outputs, then its event."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.event = EventOverlap()

    def keep(self, *tensors: torch.Tensor | None) -> None:
        """Registers outputs, so they are handed to the caller's stream or kept alive by the event."""
        self.outputs.extend(t for t in tensors if isinstance(t, torch.Tensor))


class CommStream:
    """The stream EP work runs on, apart from the caller's compute stream (CUDA only).

    ``scope`` makes the communication stream wait for ``previous_event`` (or for the caller's stream),
    runs the body there, then either makes the caller wait (``async_finish=False``) or leaves the
    caller free and hands back an event. Outputs made on the communication stream are recorded on the
    caller's stream unless ``allocate_on_comm_stream`` asks to leave their ownership there. A plain
    synchronous call (no previous event, no async finish, outputs owned by the caller) runs on the
    caller's stream itself: the order is the same, without the stream switches, and its event is empty.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    @contextmanager
    def scope(self, previous_event: EventOverlap | None = None, async_finish: bool = False,
              allocate_on_comm_stream: bool = False) -> Iterator[CommWork]:
        work = CommWork()
        if self.stream is None:
            yield work
            return
        waits_for_event = previous_event is not None and previous_event.event is not None
        if not (waits_for_event or async_finish or allocate_on_comm_stream):
            yield work  # the work is on the caller's stream already: no event to hand back (as DeepEP)
            return
        compute = torch.cuda.current_stream(self.device)
        if waits_for_event:
            self.stream.wait_event(previous_event.event)
        else:
            self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            yield work
        event = torch.cuda.Event()
        event.record(self.stream)
        tensors = [t for t in work.outputs if t.is_cuda]
        if not allocate_on_comm_stream:
            for t in tensors:
                t.record_stream(compute)
        if async_finish:
            work.event = EventOverlap(event, tensors)
        else:
            compute.wait_event(event)
            work.event = EventOverlap(event)
