"""Build the tokenized train/eval datasets (Arrow, via `datasets`), once per run.

Rank 0 reads, validates and tokenizes, then saves to <run_dir>/data; the other ranks wait at a
barrier and load the saved Arrow files (memory-mapped), so every rank sees identical data.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .chat import DataError, end_of_turn_id, read_conversations, tokenize_conversation, truncate

COLUMNS = ["input_ids", "labels"]


def _read_all(paths: List[str]) -> List[dict]:
    rows = []
    for path in paths:
        for conv in read_conversations(path):
            rows.append({"messages": conv.messages, "where": conv.where})
    return rows


def _tokenize_fn(tokenizer, eot_id: int, max_len: int):
    def fn(batch):
        out = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "truncated": []}
        for messages in batch["messages"]:
            ids, labels = tokenize_conversation(tokenizer, messages, eot_id)
            out["truncated"].append(len(ids) > max_len)
            ids, labels = truncate(ids, labels, max_len)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["n_targets"].append(sum(1 for t in labels[1:] if t != -100))
        return out

    return fn


def _tokenize(rows, tokenizer, eot_id, cfg, name):
    from datasets import Dataset

    if not rows:
        return None, {}
    ds = Dataset.from_list(rows)
    ds = ds.map(_tokenize_fn(tokenizer, eot_id, cfg.max_seq_len), batched=True, batch_size=64,
                num_proc=cfg.num_proc if cfg.num_proc > 1 else None, remove_columns=["messages"],
                desc=f"tokenizing {name}")
    n_read = len(ds)
    dropped = [w for w, n in zip(ds["where"], ds["n_targets"]) if n == 0]
    if cfg.drop_without_targets and dropped:
        ds = ds.filter(lambda n: n > 0, input_columns=["n_targets"])
    lengths = np.asarray(ds["length"]) if len(ds) else np.zeros(1)
    stats = {
        "conversations_read": n_read,
        "conversations_kept": len(ds),
        "dropped_no_target_after_truncation": len(dropped),
        "dropped_examples": dropped[:5],
        "truncated": int(sum(ds["truncated"])) if len(ds) else 0,
        "tokens": int(lengths.sum()),
        "target_tokens": int(sum(ds["n_targets"])) if len(ds) else 0,
        "length_p50": float(np.percentile(lengths, 50)),
        "length_p90": float(np.percentile(lengths, 90)),
        "length_max": int(lengths.max()),
    }
    if len(ds) == 0:
        raise DataError(f"{name}: no conversation is left to train on (all {n_read} lost their assistant turns to truncation at data.max_seq_len={cfg.max_seq_len}); raise data.max_seq_len.")
    return ds, stats


def prepare(cfg_data, tokenizer, eot_id: int, out_dir: str) -> Dict:
    """Read, validate, split, tokenize and save to out_dir/{train,eval}; returns the stats."""
    train_rows = _read_all(list(cfg_data.train_files))
    if not train_rows:
        raise DataError(f"{', '.join(cfg_data.train_files)}: no conversations found; the training files are empty.")
    eval_rows = _read_all(list(cfg_data.eval_files))
    if not eval_rows and cfg_data.eval_fraction > 0:
        order = list(range(len(train_rows)))
        random.Random(cfg_data.seed).shuffle(order)
        n_eval = max(1, int(len(order) * cfg_data.eval_fraction))
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    train_ds, train_stats = _tokenize(train_rows, tokenizer, eot_id, cfg_data, "train")
    eval_ds, eval_stats = _tokenize(eval_rows, tokenizer, eot_id, cfg_data, "eval")
    tmp = out_dir + ".tmp"
    train_ds.save_to_disk(os.path.join(tmp, "train"))
    if eval_ds is not None:
        eval_ds.save_to_disk(os.path.join(tmp, "eval"))
    stats = {"train": train_stats, "eval": eval_stats, "max_seq_len": cfg_data.max_seq_len}
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return stats


def load(out_dir: str) -> Tuple[object, Optional[object], Dict]:
    from datasets import load_from_disk

    train = load_from_disk(os.path.join(out_dir, "train"))
    eval_path = os.path.join(out_dir, "eval")
    evals = load_from_disk(eval_path) if os.path.isdir(eval_path) else None
    with open(os.path.join(out_dir, "stats.json")) as f:
        stats = json.load(f)
    return train, evals, stats


def prepare_once(cfg_data, tokenizer, eot_id, out_dir, rank: int, barrier: Callable[[], None]):
    """Rank 0 prepares, every rank then loads the same files."""
    error = None
    if rank == 0:
        try:
            prepare(cfg_data, tokenizer, eot_id, out_dir)
        except DataError as e:
            error = e
            if os.path.exists(out_dir):  # never let other ranks read a stale copy
                import shutil

                shutil.rmtree(out_dir)
    barrier()
    if error is not None:
        raise error
    if not os.path.isdir(out_dir):
        raise DataError("the training data could not be prepared; see the message printed by rank 0.")
    return load(out_dir)
