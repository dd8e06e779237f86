"""Tokenization throughput of the data pipeline (conversations/s), CPU only.

    python bench/tokenize_speed.py [--repeat 10] [--num-proc 2]

On the bundled sample (repeated --repeat times) with the embedded tiny tokenizer (a Rust,
byte-level BPE "fast" tokenizer), it measures
  1. tokenization + labels, exact path: the chat template rendered per conversation;
  2. tokenization + labels, fast path (data.fast_tokenization=true, the default), 1 process;
  3. the fast path in --num-proc processes (fork; each takes a contiguous share);
  4. the whole `build` (read, validate, tokenize, write Arrow, stats) with data.num_proc=1 and --num-proc.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_WORK = {}


def _encode_share(bounds):
    from data_pipeline.chat import encode

    w = _WORK
    for messages in w["convs"][bounds[0]:bounds[1]]:
        encode(w["tok"], messages, w["eot"], 4096, fast=w["fast"])
    return bounds[1] - bounds[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    import datasets
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from data_pipeline.chat import encode, end_of_turn_id
    from data_pipeline.dataset import build, fast_encoder
    from train.config import DataConfig

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model" / "tiny" / "tokenizer"))
    eot = end_of_turn_id(tok)
    sample = ROOT / "data_pipeline" / "sample_data" / "train.jsonl"
    convs = [json.loads(line)["messages"] for line in sample.read_text().splitlines()] * args.repeat
    fast, how = fast_encoder(tok, eot, convs[:64])
    rows = []

    t = time.perf_counter()
    for m in convs[: len(convs) // 3]:
        encode(tok, m, eot, 4096)
    rows.append(("tokenize, exact path, 1 process", len(convs) // 3 / (time.perf_counter() - t)))
    t = time.perf_counter()
    for m in convs:
        encode(tok, m, eot, 4096, fast=fast)
    rows.append(("tokenize, fast path, 1 process", len(convs) / (time.perf_counter() - t)))
    _WORK.update(convs=convs, tok=tok, eot=eot, fast=fast)
    n = args.num_proc
    shares = [(len(convs) * i // n, len(convs) * (i + 1) // n) for i in range(n)]
    with mp.get_context("fork").Pool(n) as pool:
        pool.map(_encode_share, [(0, 1)] * n)  # workers started before the clock
        t = time.perf_counter()
        done = sum(pool.map(_encode_share, shares))
        rows.append((f"tokenize, fast path, {n} processes", done / (time.perf_counter() - t)))

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jsonl"
        big.write_text(sample.read_text() * args.repeat)
        for procs in sorted({1, n}):
            d = OmegaConf.merge(OmegaConf.structured(DataConfig),
                                {"train_files": [str(big)], "num_proc": procs, "max_seq_len": 4096,
                                 "duplicate_ids": "keep", "cache_dir": tmp})
            t = time.perf_counter()
            stats = build(d, tok, eot, os.path.join(tmp, f"out{procs}"), log=lambda *_: None)
            rows.append((f"whole build (read+validate+tokenize+Arrow), data.num_proc={procs}",
                         stats["train"]["conversations"] / (time.perf_counter() - t)))
    print(f"{len(convs)} conversations (bundled sample x {args.repeat}); {how}; {os.cpu_count()} CPUs")
    for name, rate in rows:
        print(f"  {name:<62} {rate:>8,.0f} conversations/s")


if __name__ == "__main__":
    main()
