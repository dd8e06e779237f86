"""Boundary-safe packing: several conversations per row, none attending to another.

`pack()` places documents into rows of at most `max_len` tokens with best-fit-decreasing
(deterministic for a seed: ties are broken by a seeded shuffle before the stable sort).
`collate_packed()` builds, per row, position ids that restart at 0 for every document and an
attention layout in which a token only sees earlier tokens of its own document:

- `varlen` (model/attention.py, `kernels.packed_attention`): `cu_seq_lens_q/k` and
  `max_length_q/k` over the flattened batch (every document, and each row's padding tail, is one
  segment), so no mask is materialised and attention work is per document.
- `flash_attention_2`: the same `cu_seq_lens_q/k` / `max_length_q/k`, which transformers' flash
  path uses as given over the flattened batch. Position ids alone are not enough there either:
  transformers reads their restarts only when a batch has ONE row; with micro_batch_size > 1 it
  ran plain causal flash attention over whole rows, across documents.
- `sdpa` / `eager` / others: an explicit 4D block-diagonal causal mask (bool for sdpa, additive
  float for eager), which transformers passes through unchanged. Position ids alone are NOT
  enough there: sdpa and eager then attend across documents (measured: see STACK-NOTES).

The first token of every document is never a target, so nothing is learnt across a boundary.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .chat import IGNORE


def cu_seqlens(segments: Sequence[int]):
    """Cumulative offsets (int32, leading 0) of the non-empty segments, and the longest one."""
    lengths = torch.tensor([0] + [n for n in segments if n > 0], dtype=torch.int32)
    return torch.cumsum(lengths, 0, dtype=torch.int32), int(lengths.max())


def pack(lengths: Sequence[int], max_len: int, seed: int = 0) -> List[List[int]]:
    """Best-fit-decreasing bins of document indices; every bin's total length <= max_len."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = sorted(order.tolist(), key=lambda i: -lengths[i])  # stable: ties keep the seeded order
    bins: List[List[int]] = []
    # free space of each open bin, kept sorted, with the bin index alongside
    free: List[int] = []
    owner: List[int] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"document {i} has {n} tokens > max_len {max_len}; truncate before packing")
        k = bisect.bisect_left(free, n)  # tightest bin that still fits
        if k < len(free):
            b = owner.pop(k)
            space = free.pop(k) - n
            bins[b].append(i)
        else:
            b = len(bins)
            bins.append([i])
            space = max_len - n
        if space > 0:
            k = bisect.bisect_left(free, space)
            free.insert(k, space)
            owner.insert(k, b)
    return bins


def fill_ratio(bins: List[List[int]], lengths: Sequence[int], max_len: int) -> float:
    return sum(lengths[i] for b in bins for i in b) / max(1, len(bins) * max_len)


def collate_packed(rows: Sequence[Sequence[Dict]], pad_id: int, attn_implementation: str,
                   dtype: torch.dtype = torch.float32, pad_to_multiple_of: int = 8,
                   sliding_window: Optional[int] = None, pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """rows: each a list of documents ({'input_ids', 'labels'}) to concatenate into one row.
    sliding_window: the model's (uniform) attention window, applied by the 4D mask.
    pad_to: every row padded to this length (the pack capacity), so that all batches have one
    shape (kernels.compile: one graph instead of a recompile per row length); else the longest row."""
    longest = max(sum(len(d["input_ids"]) for d in row) for row in rows)
    L = -(-max(longest, pad_to or 0) // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seq = torch.full((B, L), -1, dtype=torch.long)  # document number within the row, -1 = padding
    for b, row in enumerate(rows):
        at = 0
        for d, doc in enumerate(row):
            n = len(doc["input_ids"])
            ids[b, at:at + n] = torch.as_tensor(doc["input_ids"])
            lab = torch.as_tensor(doc["labels"]).clone()
            lab[0] = IGNORE  # would be predicted from the previous document's last token
            if doc.get("is_padding"):
                lab[:] = IGNORE
            labels[b, at:at + n] = lab
            pos[b, at:at + n] = torch.arange(n)
            seq[b, at:at + n] = d
            at += n
        pos[b, at:] = torch.arange(L - at)  # padding: harmless positions, never attended to
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if attn_implementation in ("varlen", "flash_attention_2"):
        segments = []
        for row in rows:
            lengths = [len(d["input_ids"]) for d in row]
            segments += lengths + [L - sum(lengths)]  # the padding tail attends only to itself
        cu, longest = cu_seqlens(segments)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return batch
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    same_doc = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    allowed = same_doc & causal
    if sliding_window:
        i = torch.arange(L)
        allowed &= (i[:, None] - i[None, :]) < sliding_window
    allowed |= torch.eye(L, dtype=torch.bool)  # padding rows see themselves: no all-masked row (NaN)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        batch["attention_mask"] = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=dtype)
        batch["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return batch
