"""Rebuild the bundled sample from the full files in ../shared/data (maintainers only).

Usage: python data_pipeline/sample_data/make_slice.py ../shared/data
The slice is deterministic (seeded), so re-running it reproduces the committed files.
"""
import gzip
import json
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (file, how many for train, how many for eval); eval rows never overlap train rows.
PLAN = {
    "bitext_customer_support.jsonl.gz": (160, 30),
    "sgd_train.jsonl.gz": (120, 0),
    "validation/sgd_dev.jsonl.gz": (0, 30),
    "crosswoz_zh_val.jsonl.gz": (24, 0),
    "abcd_sample.jsonl.gz": (3, 0),
}
INTENTS = ("intent/banking77_train.jsonl.gz", 300)


def read(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(src):
    src = Path(src)
    rng = random.Random(1234)
    train, evals = [], []
    for name, (n_train, n_eval) in PLAN.items():
        rows = read(src / name)
        picked = rng.sample(rows, min(len(rows), n_train + n_eval))
        train += picked[:n_train]
        evals += picked[n_train:]
    rng.shuffle(train)
    write(HERE / "train.jsonl", train)
    write(HERE / "eval.jsonl", evals)
    write(HERE / "intents.jsonl", rng.sample(read(src / INTENTS[0]), INTENTS[1]))
    for lic in (src / "LICENSES").iterdir():
        shutil.copy(lic, HERE / "LICENSES" / lic.name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
