"""``moekit.compat.deep_ep`` takes DeepEP v1's arguments, names and order, call for call."""

import inspect

import torch

import moekit.compat.deep_ep as deep_ep

# DeepEP v1's parameter lists (spec/ep-api.md), in order.
DEEP_EP_V1 = {
    "__init__": ["group", "num_nvl_bytes", "num_rdma_bytes", "low_latency_mode", "num_qps_per_rank",
                 "allow_nvlink_for_low_latency_mode", "allow_mnnvl", "explicitly_destroy", "enable_shrink", "comm"],
    "get_dispatch_layout": ["topk_idx", "num_experts", "previous_event", "async_finish", "allocate_on_comm_stream"],
    "dispatch": ["x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank",
                 "num_tokens_per_expert", "topk_idx", "topk_weights", "expert_alignment", "num_worst_tokens", "config",
                 "previous_event", "async_finish", "allocate_on_comm_stream"],
    "combine": ["x", "handle", "topk_weights", "bias", "config", "previous_event", "async_finish",
                "allocate_on_comm_stream"],
    "low_latency_dispatch": ["x", "topk_idx", "num_max_dispatch_tokens_per_rank", "num_experts",
                             "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats", "use_fp8",
                             "round_scale", "use_ue8m0", "async_finish", "return_recv_hook"],
    "low_latency_combine": ["x", "topk_idx", "topk_weights", "handle", "use_logfmt", "zero_copy", "async_finish",
                            "return_recv_hook", "out", "combine_wait_recv_cost_stats"],
    "get_next_low_latency_combine_buffer": ["handle"],
    "clean_low_latency_buffer": ["num_max_dispatch_tokens_per_rank", "hidden", "num_experts"],
    "destroy": [],
}
STATIC = {
    "set_num_sms": ["new_num_sms"],
    "get_dispatch_config": ["num_ranks"],
    "get_combine_config": ["num_ranks"],
    "get_low_latency_rdma_size_hint": ["num_max_dispatch_tokens_per_rank", "hidden", "num_ranks", "num_experts"],
    "capture": [],
}


def _positional(fn, skip_self: bool):
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def test_methods_take_deep_ep_arguments_in_order():
    for name, params in DEEP_EP_V1.items():
        assert _positional(getattr(deep_ep.Buffer, name), skip_self=True) == params, name


def test_static_methods_and_defaults():
    for name, params in STATIC.items():
        assert isinstance(inspect.getattr_static(deep_ep.Buffer, name), staticmethod), name
        assert _positional(getattr(deep_ep.Buffer, name), skip_self=False) == params, name
    assert deep_ep.Buffer.num_sms == 20
    init = inspect.signature(deep_ep.Buffer.__init__).parameters
    assert init["num_qps_per_rank"].default == 24 and init["allow_nvlink_for_low_latency_mode"].default is True
    ll = inspect.signature(deep_ep.Buffer.low_latency_dispatch).parameters
    assert ll["use_fp8"].default is True and ll["round_scale"].default is False


def test_config_and_event_construct_positionally():
    config = deep_ep.Config(24, 6, 256, 6, 128)
    assert (config.num_sms, config.num_max_nvl_chunked_recv_tokens, config.num_max_rdma_chunked_recv_tokens) == (24, 256,
                                                                                                               128)
    assert deep_ep.EventOverlap(None, None).extra_tensors is None
    assert deep_ep.topk_idx_t is torch.int64
