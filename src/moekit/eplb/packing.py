"""Balanced packing: ``n`` weighted items into ``m`` packs of exactly ``n / m`` items each.

:func:`balanced_packing` is DeepSeek EPLB's greedy (heaviest item first into the lightest pack
that still has room), run for all rows at once: one tensor step per item rank instead of a Python
loop per row and item. :func:`refine_packing` then lowers the heaviest pack by pairwise swaps.
"""

from __future__ import annotations

import numpy as np
import torch

# A swap must lower the heaviest pack by this relative margin; float noise is not an improvement.
_REL_GAIN = 1e-9


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of each row of ``weight`` [X, n] into ``num_packs`` packs of ``n / num_packs`` items.

    Items are taken heaviest first (stable: equal weights in index order) and each goes to the pack
    of smallest accumulated float32 load that has room, ties to the lowest pack index. With one item
    per pack the packing is the identity, as in the published algorithm.

    Returns ``(pack_index, rank_in_pack)``, both int64 [X, n] on ``weight``'s device.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    device = weight.device
    if per_pack == 1:
        pack_index = torch.arange(n, dtype=torch.int64, device=device).expand(rows, n).clone()
        return pack_index, torch.zeros_like(pack_index)
    # numpy: a step touches a few values per row, where torch's per-op overhead would dominate
    w = weight.detach().float().cpu()
    order = w.sort(dim=-1, descending=True, stable=True).indices.numpy()
    w = w.numpy()
    row = np.arange(rows)
    pack_load = np.zeros((rows, num_packs), dtype=np.float32)
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    for j in range(n):
        item = order[:, j]
        pack = np.where(pack_items < per_pack, pack_load, np.float32(np.inf)).argmin(axis=-1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = pack_items[row, pack]
        pack_load[row, pack] += w[row, item]
        pack_items[row, pack] += 1
    pack_index, rank_in_pack = torch.from_numpy(pack_index).to(device), torch.from_numpy(rank_in_pack).to(device)
    return pack_index, rank_in_pack


def refine_packing(weight: torch.Tensor, pack_index: torch.Tensor, rank_in_pack: torch.Tensor,
                   num_packs: int, max_iters: int = 64, partners: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowers the heaviest pack of each row by swapping one of its items with an item of another pack.

    Each step takes, per row, the swap between the heaviest pack and one of the ``partners``
    lightest packs that minimises the larger of the two new pack loads, and only if that is below
    the current heaviest load: no pack ever exceeds the starting maximum, so
    the result is never worse than the input packing. Rows stop when no swap helps.

    Args:
        weight: [X, n] item weights (computed in float64).
        pack_index, rank_in_pack: int64 [X, n], a packing with ``n / num_packs`` items per pack.
        num_packs: number of packs.
        max_iters: bound on swap steps per row.
        partners: how many of the lightest packs each step tries to swap with; by default enough
            for about 64 candidate items (all other packs when packs are small).

    Returns the refined ``(pack_index, rank_in_pack)``, int64 [X, n].
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if num_packs == 1:
        return pack_index, rank_in_pack
    device = weight.device
    w = weight.double()
    # slots[x, p, r] = item at rank r of pack p
    slots = torch.empty(rows, num_packs * per_pack, dtype=torch.int64, device=device)
    slots.scatter_(1, pack_index * per_pack + rank_in_pack,
                   torch.arange(n, device=device).expand(rows, n))
    if partners is None:
        partners = 64 // per_pack
    partners = max(1, min(partners, num_packs - 1))
    active = torch.arange(rows, device=device)
    for _ in range(max_iters):
        if active.numel() == 0:
            break
        s = slots[active]
        row = torch.arange(len(active), device=device)
        ws = w[active].gather(1, s).view(-1, num_packs, per_pack)          # weight by pack and rank
        loads = ws.sum(-1)                                                  # [A, P]
        top, hi = loads.max(dim=-1)
        # the lightest packs are where a heavy item can go; considering only a few keeps a step cheap
        light = loads.topk(partners, dim=-1, largest=False).indices        # [A, K]
        cand_w = ws.gather(1, light.unsqueeze(-1).expand(-1, -1, per_pack)).flatten(1)  # [A, K*S]
        cand_load = loads.gather(1, light).repeat_interleave(per_pack, dim=1)
        delta = ws[row, hi].unsqueeze(-1) - cand_w.unsqueeze(1)            # [A, S, K*S]
        pair_max = torch.maximum(top.view(-1, 1, 1) - delta, cand_load.unsqueeze(1) + delta)
        best, flat = pair_max.flatten(1).min(dim=-1)
        gain = best < top * (1 - _REL_GAIN)
        if not bool(gain.any()):
            break
        active, s, hi, light, flat = active[gain], s[gain], hi[gain], light[gain], flat[gain]
        width = partners * per_pack
        a_slot = hi * per_pack + flat // width
        b_col = flat % width
        b_slot = light.gather(1, (b_col // per_pack).unsqueeze(1)).squeeze(1) * per_pack + b_col % per_pack
        a_item = s.gather(1, a_slot.unsqueeze(1))
        b_item = s.gather(1, b_slot.unsqueeze(1))
        s.scatter_(1, a_slot.unsqueeze(1), b_item)
        s.scatter_(1, b_slot.unsqueeze(1), a_item)
        slots[active] = s
    position = torch.empty_like(slots)
    position.scatter_(1, slots, torch.arange(n, device=device).expand(rows, n))
    return position // per_pack, position % per_pack
