"""Config, size hints, events and the Buffer's static settings (one process, no group)."""

import pytest
import torch

from moekit.ep import Buffer, Config, EventOverlap


def test_recommended_configs_follow_the_sm_setting():
    Buffer.set_num_sms(24)
    try:
        assert Buffer.get_dispatch_config(2).num_sms == 24
        assert Buffer.get_combine_config(8).num_max_nvl_chunked_send_tokens == 4
        # a group size without its own entry takes the next larger one
        assert Buffer.get_dispatch_config(6) == Buffer.get_dispatch_config(8)
    finally:
        Buffer.set_num_sms(20)


def test_size_hints_grow_with_the_work():
    config = Config(20, 6, 256, 6, 128)
    small, large = config.get_nvl_buffer_size_hint(7168 * 2, 2), config.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert 0 < small < large and small % 128 == 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    hint = Buffer.get_low_latency_rdma_size_hint
    assert hint(128, 7168, 8, 256) > hint(64, 7168, 8, 256) > hint(64, 4096, 8, 256) > 0
    # at least two parities of the receive slabs: E * T rows of bf16
    assert hint(128, 7168, 8, 256) >= 2 * 256 * 128 * 7168 * 2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("ranks,tokens,hidden,experts", [(2, 1, 128, 2), (2, 128, 7168, 256), (3, 5, 384, 9),
                                                         (8, 256, 7168, 256), (16, 64, 2048, 32)])
def test_low_latency_layout_fits_its_size_hint(fp8, ranks, tokens, hidden, experts):
    from moekit.ep.triton_low_latency import make_layout

    layout = make_layout(ranks, tokens, hidden, experts, fp8)
    assert 2 * layout.end <= Buffer.get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts)
    # the areas in order, none overlapping the next
    assert layout.recv >= layout.rows + 8 * experts and layout.send == layout.recv + layout.recv_bytes
    assert layout.weights >= layout.send + experts // ranks * ranks * tokens * hidden * 2


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_config_rejects_bad_values(bad):
    with pytest.raises((TypeError, ValueError), match="Config.num_max_nvl_chunked_send_tokens"):
        Config(20, bad)


def test_events_do_nothing_on_cpu():
    event = Buffer.capture()
    assert isinstance(event, EventOverlap) and event.event is None
    event.current_stream_wait()
    with EventOverlap(None, [torch.zeros(1)]) as held:
        assert held.extra_tensors is not None


def test_buffer_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        Buffer(None)
