"""Throughput of dialtune against the hand-written HF Trainer + PEFT recipe, side by side.

    python bench/run.py --shape llama3-8b|llama3-1b|qwen2.5-7b|tiny [--quant int8,nf4,bf16]
        [--which hf,dialtune[,dialtune:LEVER=V:...][,QUANT/dialtune:LEVER=V...]] [--steps 10] [--warmup 2]
        [--tokens-per-batch 4096] [--append-results] [--device cuda|cpu]

Both paths train the same random-init base of the shape (written once to --model-cache; nothing
is downloaded) with the same LoRA (r16, alpha 32, q,k,v,o,gate,up,down) on synthetic
conversations shaped like the bundled data (lengths and assistant-token masks of
data_pipeline/sample_data/train.jsonl under the committed tiny tokenizer; random token ids):

  hf        bench/hf_baseline.py: HF Trainer, bitsandbytes, gradient checkpointing, SDPA, batches
            of --batch-size conversations with dynamic padding
  dialtune  bench/dialtune_path.py: packed rows of --pack-len tokens (--tokens-per-batch per step),
            model/kernels.py levers; `dialtune:fused_ce=0:liger=0` adds a row with levers changed

Rows run quantization by quantization (every --which item for int8, then for nf4, ...); an item
written `QUANT/ITEM` (e.g. `int8/dialtune:fast_int8=0`) runs once, for that quantization (when
--quant has it), after all of those: lever rows that --time-budget skips first when time runs short.

One table: real (non-pad) tok/s, target tok/s, padded tok/s, peak GPU memory, MFU
(train/flops.py) and the ratio of real tok/s to the hf row of the same quantization.
`--append-results` appends it to bench/RESULTS.md with date, GPU, versions and the command.
On CUDA every row runs in its own process (clean peak memory; Liger patches transformers
process-wide); on CPU they run in this process (`--shape tiny --device cpu`: ~15 s, mostly imports).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# as a script, sys.path[0] is bench/ itself, whose module names (common, run) could shadow others:
# import them as bench.* from the repository root instead
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "bench")]

import torch  # noqa: E402

from bench.common import DTYPES, SHAPES, prepare_model_dir, quiet, say  # noqa: E402

QUANTS = tuple(DTYPES)


def parse_which(text: str, quants=QUANTS):
    """'hf,dialtune,dialtune:liger=0:ckpt=2,bf16/dialtune:compile=1' -> [(label, path, levers, quant)],
    quant None for the items that run for every --quant."""
    from bench.dialtune_path import LEVERS

    out = []
    for item in filter(None, text.split(",")):
        quant, _, body = item.rpartition("/")
        if quant and quant not in quants:
            raise ValueError(f"--which item {item!r}: {quant!r} is not one of {', '.join(quants)}")
        path, *pairs = body.split(":")
        if path not in ("hf", "dialtune") or (path == "hf" and pairs):
            raise ValueError(f"--which item {item!r}: use hf, dialtune, or dialtune:LEVER=VALUE[:...], "
                             "optionally after QUANT/")
        levers = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "budget" and value == "auto":
                levers[key] = value
                continue
            if key not in LEVERS or not value.isdigit():
                raise ValueError(f"--which item {item!r}: levers are {', '.join(LEVERS)} with integer values (budget: or auto)")
            levers[key] = int(value)
        out.append((body, path, levers, quant or None))
    return out


def plan_rows(which, quants):
    """[(quant, label, path, levers)]: the unpinned items for each quant in turn, then the pinned
    ones whose quant is among them."""
    rows = [(q, label, path, levers) for q in quants for label, path, levers, pin in which if pin is None]
    return rows + [(pin, label, path, levers) for label, path, levers, pin in which if pin in quants]


def run_spec(spec):
    """One row, in this process; never raises (a failed row is reported in the table)."""
    t = time.time()
    quiet()
    try:
        if spec["path"] == "hf":
            from bench.hf_baseline import run
        else:
            from bench.dialtune_path import run
        torch.manual_seed(spec["seed"])
        result = run(spec, spec["peak"])
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    return {"label": spec["label"], "path": spec["path"], "quant": spec["quant"], "wall_s": time.time() - t, **result}


def run_isolated(spec, timeout=None):
    """One row in a child process (its log goes to our stderr); killed after `timeout` seconds."""
    failed = {"label": spec["label"], "path": spec["path"], "quant": spec["quant"]}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"killed: past the --time-budget ({timeout:.0f} s were left for it)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {**failed, "error": f"failed: worker exited with code {proc.returncode} (its log is above)"}


def _fmt(x, pattern):
    return "-" if x is None else pattern.format(x)


def _count(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def table(results) -> str:
    hf = {r["quant"]: r.get("real_tok_s") for r in results if r["path"] == "hf" and "error" not in r}
    lines = ["| path | quant | real tok/s | target tok/s | padded tok/s | peak GiB | MFU | vs hf |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['quant']} | {r['error'].replace('|', '/')} | | | | | |")
            continue
        base = hf.get(r["quant"])
        lines.append(" | ".join([
            f"| {r['label']}", r["quant"], f"{r['real_tok_s']:,.0f}", f"{r['target_tok_s']:,.0f}",
            f"{r['padded_tok_s']:,.0f}", _fmt(r.get("peak_gib"), "{:.1f}"), _fmt(r.get("mfu"), "{:.1%}"),
            f"{r['real_tok_s'] / base:.2f}" if base else "-"]) + " |")
    return "\n".join(lines)


def legend(results, args, peak, device_name) -> str:
    ok = [r for r in results if "error" not in r]
    seq = ", ".join(f"{label} {n:.0f}" for label, n in {r["label"]: r["effective_seq_len"] for r in ok}.items()) or "-"
    notes = "; ".join(f"{r['label']} {r['quant']}: {r['notes']}" for r in ok if r.get("notes"))
    peak_txt = f"{peak / 1e12:,.0f} TFLOP/s bf16 dense ({device_name})" if peak else f"unknown for {device_name}: no MFU"
    return "\n".join([
        f"real = non-pad tokens, target = tokens with a loss (assistant), padded = all positions; per second over "
        f"{_count(args.steps, 'step')} after {_count(args.warmup, 'warm-up step')}. hf: batches of "
        f"{args.batch_size} conversations; dialtune: {args.tokens_per_batch} tokens per step in rows of "
        f"{args.pack_len}. MFU = real tok/s x train/flops.py (6 x matmul params + attention at the token-weighted "
        f"mean conversation length: {seq} tokens) / peak {peak_txt}. vs hf = real tok/s / the hf row of the same "
        "quant. Peak = torch.cuda.max_memory_allocated. Single process, no DeepSpeed.",
        *([f"Levers applied: {notes}."] if notes else []),
    ])


def versions() -> str:
    out = []
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} absent")
    return ", ".join(out)


def append_results(path, args, text, device_name):
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in args.argv)
    shape = f"{args.shape}, {args.layers} layers" if args.layers else args.shape
    entry = (f"\n## {datetime.date.today().isoformat()} · {device_name} · {shape}\n\n{versions()}\n\n"
             f"```bash\n{command}\n```\n\n{text}\n")
    with open(path, "a") as f:
        f.write(entry)
    say(f"appended to {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's); e.g. 4: a shallow "
                    "model of the shape's width, for per-layer costs (recompute, kernels) in seconds")
    ap.add_argument("--quant", default="int8,nf4,bf16", help=f"comma list of {', '.join(QUANTS)}")
    ap.add_argument("--which", default="hf,dialtune", help="comma list: hf, dialtune, dialtune:LEVER=V[:LEVER=V] "
                    "(levers: packing varlen fused_ce fast_int8 fused_lora liger compile 0/1, varlen 2, ckpt 0/1/k = every "
                    "k-th layer, budget GiB or auto for kernels.memory_budget_gib); QUANT/ITEM runs ITEM for that quant only, after the rest")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before measuring (>= 1)")
    ap.add_argument("--tokens-per-batch", type=int, default=4096, help="dialtune: tokens per step (packed)")
    ap.add_argument("--pack-len", type=int, default=None, help="dialtune: packed row length (default: tokens per batch); "
                    "also the longest conversation of both paths")
    ap.add_argument("--batch-size", type=int, default=8, help="hf (and dialtune:packing=0): conversations per step")
    ap.add_argument("--lengths", choices=("bundled", "lognormal"), default="bundled",
                    help="conversation shapes: the bundled data, or log-normal around 350 tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "dialtune-bench"),
                    help="where the random base is written once per shape (local disk: 16 GB for 8B)")
    ap.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                    help="a process per row (auto: on CUDA) or all rows in this one")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; skip rows that would not fit (0: no limit)")
    ap.add_argument("--append-results", action="store_true", help="append the table to --results-file")
    ap.add_argument("--results-file", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--jsonl", help="also write every row's full result here, one JSON per line")
    ap.add_argument("--profile", help="dialtune rows: profile one extra step after the measured ones (torch.profiler) "
                    "and append its top kernels to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv
    if args.worker:
        print("RESULT " + json.dumps(run_spec(json.loads(args.worker))), flush=True)
        return 0
    if args.shape is None:
        ap.error("--shape is required")
    quants = [q for q in args.quant.split(",") if q]
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        ap.error(f"--quant {','.join(bad)}: choose from {', '.join(QUANTS)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    try:
        which = parse_which(args.which)
    except ValueError as e:
        ap.error(str(e))
    args.pack_len = args.pack_len or args.tokens_per_batch

    from train.flops import peak_flops

    t_start = time.time()
    quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # device_map and bitsandbytes want an index
        device = torch.device("cuda", torch.cuda.current_device())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(device)
    isolate = args.isolate == "process" or args.isolate == "auto" and device.type == "cuda"
    say(f"{args.shape} on {device_name}; rows run {'each in its own process' if isolate else 'in this process'}; "
        "single process per row, no DeepSpeed")
    results, longest, no_base = [], {}, None
    try:
        model_dir = prepare_model_dir(args.shape, args.model_cache, device, args.layers)
    except Exception as e:  # every row says why, and the table still comes out
        traceback.print_exc()
        model_dir, no_base = None, f"failed: building the {args.shape} base: {type(e).__name__}: {e}"[:200]
    for quant, label, path, levers in plan_rows(which, quants):
        left = args.time_budget - (time.time() - t_start) if args.time_budget else None
        # a row of this path took this long (the hf rows are the slow ones); any row if none has run
        need = longest.get(path, max(longest.values(), default=0.0))
        if no_base:
            results.append({"label": label, "path": path, "quant": quant, "error": no_base})
            continue
        if left is not None and left < need:
            results.append({"label": label, "path": path, "quant": quant,
                            "error": f"skipped: {left:.0f} s of --time-budget left, a {path} row took {need:.0f} s"})
            continue
        spec = dict(label=label, path=path, levers=levers, quant=quant, shape=args.shape, model_dir=model_dir,
                    device=str(device), steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                    tokens_per_batch=args.tokens_per_batch, pack_len=args.pack_len, max_len=args.pack_len,
                    lengths=args.lengths, seed=args.seed, peak=peak,
                    profile=args.profile and os.path.abspath(args.profile))
        say(f"--- {label} {quant}")
        t_row = time.time()
        r = run_isolated(spec, left) if isolate else run_spec(spec)
        longest[path] = max(longest.get(path, 0.0), time.time() - t_row)  # the child's start and imports included
        results.append(r)
        if "error" not in r:
            say(f"{label} {quant}: {r['real_tok_s']:,.0f} real tok/s, {r['wall_s']:.0f} s")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
    text = table(results) + "\n\n" + legend(results, args, peak, device_name)
    print(text, flush=True)
    if args.append_results:
        append_results(args.results_file, args, text, device_name)
    say(f"done in {time.time() - t_start:.0f} s")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
