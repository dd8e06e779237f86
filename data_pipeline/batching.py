"""Deterministic, rank-sharded micro-batches and padding collation.

Every rank gets the same number of micro-batches per epoch (a must under ZeRO-3, where all
ranks take part in every forward), and the order depends only on (seed, epoch), so a resumed run
can skip exactly the micro-batches already consumed.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .chat import IGNORE


def epoch_micro_batches(n: int, micro_batch_size: int, world: int, rank: int, seed: int, epoch: int) -> List[List[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch: every example once. The
    last global micro-batch (micro_batch_size x world) is filled up with -1, a row without targets
    (fetch): the loss is a sum over target tokens divided by their count, so it changes nothing but
    the compute of one micro-batch, where leaving the tail out would skip up to micro_batch_size x
    world - 1 examples every pass."""
    return rank_slices(np.random.default_rng([seed, epoch]).permutation(n).tolist(), micro_batch_size, world, rank)


def rank_slices(order: List[int], micro_batch_size: int, world: int, rank: int) -> List[List[int]]:
    """This rank's micro-batches of `order`, global micro-batch after global micro-batch
    (micro_batch_size x world items, rank r's the r-th slice); the last filled up with -1."""
    per_step = micro_batch_size * world
    order = list(order) + [-1] * (-len(order) % per_step)
    return [order[start + rank * micro_batch_size: start + (rank + 1) * micro_batch_size] for start in range(0, len(order), per_step)]


def epoch_steps(n: int, micro_batch_size: int, world: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps for `epochs` passes, rounded up: the last step may take up to grad_accum - 1
    micro-batches of the next pass rather than leave the last ones of the final pass out (each
    pass's micro-batches continue where the previous pass's step ended). 0 when one pass has fewer
    micro-batches than one step takes."""
    per_epoch = -(-n // (micro_batch_size * world))  # (the last one filled up: epoch_micro_batches)
    return 0 if per_epoch < grad_accum else -(-epochs * per_epoch // grad_accum)


class MicroBatchStream:
    """Endless, resumable stream of this rank's micro-batches (epoch_micro_batches, epoch after
    epoch): (epoch, position) is the state a checkpoint keeps."""

    def __init__(self, n, mb, world, rank, seed, epoch=0, pos=0):
        self.args = (n, mb, world, rank, seed)
        self.epoch, self.pos = epoch, pos
        self._plan = epoch_micro_batches(*self.args, epoch)

    def next(self):
        if self.pos >= len(self._plan):
            self.epoch, self.pos = self.epoch + 1, 0
            self._plan = epoch_micro_batches(*self.args, self.epoch)
        self.pos += 1
        return self._plan[self.pos - 1]


def eval_micro_batches(n: int, micro_batch_size: int, world: int, rank: int) -> List[List[int]]:
    """Every example exactly once across ranks; -1 marks padding slots so all ranks run the
    same number of forwards."""
    return rank_slices(list(range(n)), micro_batch_size, world, rank)


def collate(examples: Sequence[Dict], pad_id: int, pad_to_multiple_of: int = 8) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is never attended to and never a target."""
    longest = max(len(e["input_ids"]) for e in examples)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        mask[i, :n] = 1
        if not e.get("is_padding"):
            labels[i, :n] = torch.as_tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fetch(ds, indices: Sequence[int]) -> List[Dict]:
    """Rows for indices; -1 (padding: eval's, a pass's last training micro-batch) is row 0's first
    token, without a target (every rank runs the forward; it costs, and counts in perf/tokens, one token)."""
    real = [i if i >= 0 else 0 for i in indices]
    rows = ds[real]
    out = []
    for k, i in enumerate(indices):
        ids, labels = (rows["input_ids"][k], rows["labels"][k]) if i >= 0 else (rows["input_ids"][k][:1], [IGNORE])
        out.append({"input_ids": ids, "labels": labels, "is_padding": i < 0})
    return out


def target_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted (labels shifted by one), i.e. what the loss is summed over."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def model_inputs(batch, dev) -> dict:
    """A training batch's forward kwargs on `dev`, without labels and with use_cache=False: a
    model whose config keeps use_cache=True (any run without gradient checkpointing) would
    otherwise build a KV cache in every training forward, which nothing reads and whose state
    torch.compile guards on (recompiling layer by layer)."""
    inputs = {key: v.to(dev) if torch.is_tensor(v) else v for key, v in batch.items() if key != "labels"}
    inputs["use_cache"] = False
    return inputs
