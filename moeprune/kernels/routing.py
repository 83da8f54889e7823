"""Routing preparation for grouped expert matmuls (torch, no host sync).

Token-expert *pairs* are numbered ``p = t * top_k + j`` (row-major ``top_k_index``), ``S = T * top_k``.
Expert ids outside ``[0, num_experts)`` (expert-parallel sentinels) are dropped: they sort last and
are counted nowhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SortedRouting", "AlignedRouting", "sort_by_expert", "align_block_size"]


class SortedRouting(NamedTuple):
    sorted_pair_ids: torch.Tensor  # [S] int64: pair ids ordered by expert (stable), dropped pairs last
    sorted_expert_ids: torch.Tensor  # [S] int64: expert of each sorted pair (num_experts for dropped)
    counts: torch.Tensor  # [E] int64: pairs per expert
    offsets: torch.Tensor  # [E + 1] int64: exclusive prefix sum of counts (offsets[-1] = valid pairs)


class AlignedRouting(NamedTuple):
    sorted_ids: torch.Tensor  # [P] int32: pair id per padded row, ``S`` on padding rows
    block_expert: torch.Tensor  # [P // block_m] int32: expert of each block of rows, -1 if unused
    num_rows_post_pad: torch.Tensor  # [] int32: used rows (sum of counts padded to block_m)
    counts: torch.Tensor  # [E] int64
    block_m: int


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> SortedRouting:
    """Sort the pairs by expert: argsort + bincount + cumsum."""
    flat = top_k_index.reshape(-1).long()
    keyed = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.argsort(keyed, stable=True)
    counts = torch.bincount(keyed, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SortedRouting(order, keyed[order], counts, offsets)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded row count (at most ``min(S, E)`` experts get a partial block)."""
    p = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-p // block_m) * block_m


def align_block_size(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Pad each expert's pairs to a multiple of ``block_m`` rows (like vLLM's moe_align_block_size).

    The row count is a static upper bound (:func:`max_padded_rows`), so nothing waits on the device;
    blocks past the used rows get ``block_expert = -1`` and are skipped by the kernels.
    """
    s = top_k_index.numel()
    dev = top_k_index.device
    r = sort_by_expert(top_k_index, num_experts)
    padded = (r.counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)  # inclusive
    pad_start = pad_end - padded
    p = max_padded_rows(s, num_experts, block_m)
    sorted_ids = torch.full((p,), s, dtype=torch.int32, device=dev)
    if s:
        valid = r.sorted_expert_ids < num_experts
        e = r.sorted_expert_ids.clamp(max=num_experts - 1)
        rank = torch.arange(s, device=dev) - r.offsets[e]
        dest = pad_start[e] + rank
        sorted_ids[dest[valid]] = r.sorted_pair_ids[valid].to(torch.int32)
    block_rows = torch.arange(0, p, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_rows, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    total = pad_end[-1] if num_experts else torch.zeros((), dtype=torch.long, device=dev)
    return AlignedRouting(sorted_ids, block_expert, total.to(torch.int32), r.counts, block_m)
