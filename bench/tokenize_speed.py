"""Tokenization throughput of the data pipeline (conversations/s), CPU only.

    python bench/tokenize_speed.py [--repeat 10] [--num-proc 2]

Measures (1) `encode` alone in one process (render with the chat template, tokenize, labels)
and (2) the whole `build` (read, validate, tokenize with num_proc, save Arrow) on the bundled
sample repeated --repeat times, with the embedded tiny tokenizer (a fast, Rust tokenizer).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from data_pipeline.chat import encode, end_of_turn_id
    from data_pipeline.dataset import build
    from train.config import DataConfig

    tok = AutoTokenizer.from_pretrained(str(ROOT / "model" / "tiny" / "tokenizer"))
    eot = end_of_turn_id(tok)
    sample = ROOT / "data_pipeline" / "sample_data" / "train.jsonl"
    convs = [json.loads(l)["messages"] for l in sample.read_text().splitlines()]
    t = time.perf_counter()
    for m in convs * 3:
        encode(tok, m, eot, 4096)
    one = 3 * len(convs) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jsonl"
        big.write_text(sample.read_text() * args.repeat)
        d = OmegaConf.merge(OmegaConf.structured(DataConfig),
                            {"train_files": [str(big)], "num_proc": args.num_proc, "max_seq_len": 4096,
                             "duplicate_ids": "keep", "cache_dir": tmp})
        t = time.perf_counter()
        stats = build(d, tok, eot, os.path.join(tmp, "out"), log=lambda *_: None)
        whole = stats["train"]["conversations"] / (time.perf_counter() - t)
    print(f"encode, 1 process: {one:,.0f} conversations/s")
    print(f"build (read+validate+tokenize+save), num_proc={args.num_proc}, {stats['train']['conversations']} conversations: {whole:,.0f} conversations/s")


if __name__ == "__main__":
    main()
