"""Paged attention: a batch plan built once per forward, cache writes and SDPA over block tables.

Tokens of all sequences are packed into one ``[tokens, ...]`` tensor so every linear layer is a
single matmul. For attention, sequences fed the same number of tokens form a group (all decodes
are one group; equal-length prefill chunks share one too), so queries never need padding: only
the key length is padded to the group's longest block table and masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F

from ..runner import SeqInput

__all__ = ["AttentionGroup", "BatchPlan", "paged_attention", "plan_batch", "write_kv"]


@dataclass(slots=True)
class AttentionGroup:
    """Sequences that were each fed ``q_len`` tokens, attended in one SDPA call."""

    rows: slice
    batch: int
    q_len: int
    block_tables: torch.Tensor
    """``[batch, blocks]`` int64; short tables are padded with block 0 (masked out)."""
    mask: torch.Tensor
    """``[batch, 1, heads_per_kv * q_len, blocks * block_size]`` bool, True where attended."""


@dataclass(slots=True)
class BatchPlan:
    """Everything a forward needs about the batch, shared by all layers."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    groups: list[AttentionGroup]
    last_rows: torch.Tensor
    """Packed row of each input sequence's last fed token, in input order."""


def _check(seq: SeqInput, index: int, block_size: int, num_blocks: int, max_len: int) -> None:
    end = seq.start_pos + len(seq.token_ids)
    if not seq.token_ids:
        raise ValueError(f"sequence {index}: no tokens to feed")
    if seq.start_pos < 0 or end > max_len:
        raise ValueError(
            f"sequence {index}: positions {seq.start_pos}..{end - 1} outside 0..{max_len - 1}"
        )
    needed = -(-end // block_size)
    if len(seq.block_table) < needed:
        raise ValueError(
            f"sequence {index}: block table has {len(seq.block_table)} blocks, "
            f"positions up to {end - 1} need {needed}"
        )
    if min(seq.block_table[:needed]) < 0 or max(seq.block_table[:needed]) >= num_blocks:
        raise ValueError(f"sequence {index}: block id outside 0..{num_blocks - 1}")


def plan_batch(
    seqs: Sequence[SeqInput],
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    heads_per_kv: int,
    device: torch.device,
) -> BatchPlan:
    """Validate ``seqs`` and lay them out for one forward (tensors built once, on ``device``)."""
    for i, seq in enumerate(seqs):
        _check(seq, i, block_size, num_blocks, max_model_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids))
    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[int] = []
    last_rows = [0] * len(seqs)
    groups: list[AttentionGroup] = []
    for q_len, members in groupby(order, key=lambda i: len(seqs[i].token_ids)):
        ids = list(members)
        first_row = len(tokens)
        for i in ids:
            seq = seqs[i]
            span = range(seq.start_pos, seq.start_pos + q_len)
            tokens.extend(seq.token_ids)
            positions.extend(span)
            blocks.extend(seq.block_table[p // block_size] for p in span)
            last_rows[i] = len(tokens) - 1
        rows = slice(first_row, len(tokens))
        groups.append(_group(seqs, ids, rows, q_len, block_size, heads_per_kv, device))
    pos = torch.tensor(positions, dtype=torch.int64)
    return BatchPlan(
        tokens=torch.tensor(tokens, dtype=torch.int64).to(device),
        positions=pos.to(device),
        slot_blocks=torch.tensor(blocks, dtype=torch.int64).to(device),
        slot_offsets=(pos % block_size).to(device),
        groups=groups,
        last_rows=torch.tensor(last_rows, dtype=torch.int64).to(device),
    )


def _group(
    seqs: Sequence[SeqInput],
    ids: list[int],
    rows: slice,
    q_len: int,
    block_size: int,
    heads_per_kv: int,
    device: torch.device,
) -> AttentionGroup:
    width = max(-(-(seqs[i].start_pos + q_len) // block_size) for i in ids)
    tables = [list(seqs[i].block_table[:width]) for i in ids]
    tables = [t + [0] * (width - len(t)) for t in tables]
    starts = torch.tensor([seqs[i].start_pos for i in ids], dtype=torch.int64)
    # Query row r of the folded GQA layout (see paged_attention) is token r % q_len.
    query_pos = starts[:, None] + torch.arange(q_len).repeat(heads_per_kv)[None, :]
    mask = torch.arange(width * block_size)[None, None, :] <= query_pos[:, :, None]
    return AttentionGroup(
        rows=rows,
        batch=len(ids),
        q_len=q_len,
        block_tables=torch.tensor(tables, dtype=torch.int64).to(device),
        mask=mask.unsqueeze(1).to(device),
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BatchPlan
) -> None:
    """Store ``k``/``v`` (``[tokens, kv_heads, head_dim]``) at the plan's cache slots."""
    k_cache[plan.slot_blocks, :, plan.slot_offsets] = k
    v_cache[plan.slot_blocks, :, plan.slot_offsets] = v


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup
) -> torch.Tensor:
    """Attend ``q`` (``[batch * q_len, heads, head_dim]``) to the group's cached keys/values.

    Returns ``[batch * q_len, heads * head_dim]``. The query heads sharing a KV head are folded
    into the query length, so grouped-query attention needs no copy of K/V per query head.
    """
    b, q_len = group.batch, group.q_len
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    per_kv = heads // kv_heads
    q = q.view(b, q_len, kv_heads, per_kv, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, kv_heads, per_kv * q_len, head_dim)
    k = k_cache[group.block_tables].transpose(1, 2).reshape(b, kv_heads, -1, head_dim)
    v = v_cache[group.block_tables].transpose(1, 2).reshape(b, kv_heads, -1, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask)
    out = out.view(b, kv_heads, per_kv, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b * q_len, heads * head_dim)
