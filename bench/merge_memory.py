"""Peak memory and time of merging a LoRA adapter into a large base on CPU (`dialtune merge`'s
streaming path, model/stream_merge.py), on a random base of a real shape written straight to disk.

    python bench/merge_memory.py --shape llama3-8b --work /tmp/merge8b [--keep]

The base is written as bf16 safetensors shards (5 GB, as on the Hub) tensor by tensor, never held
whole (an 8B model in fp32 is 32 GB; this machine may have 24); a random LoRA adapter (r16, alpha
32, all 7 linear layers, B non-zero) is written in PEFT's own layout. Then, in a child process,
`model.export.merge` (what `dialtune merge` calls) merges it into the base as bf16 (`--dtype`) 2 GB shards,
while the parent samples the child's memory every 0.1 s: peak RSS (VmHWM: includes the pages of
the memory-mapped input shard that are resident, which the kernel can drop) and peak anonymous
memory (RssAnon: what the merge itself allocates). The merged files are checked: every tensor
present with its shape, and a few merged layers equal to W + (alpha/r) B @ A recomputed here.
With `--shape tiny` the merged checkpoint is also loaded with `from_pretrained` and its logits
compared with base + adapter through PEFT (the test suite runs this).
One JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import LORA_TARGETS, TINY_TOKENIZER, say, shape_config  # noqa: E402

PREFIX = "base_model.model."


def tensor_shapes(shape: str):
    """(name, shape) of every weight of the model, in state-dict order, from a meta-device build."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def write_base(shape: str, out: str, shard_bytes: int, seed: int) -> int:
    """Random bf16 weights (std 0.02, norms 1) as sharded safetensors + index + config.json."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, shard, size, total = [], {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part{len(shards)}.safetensors"
            save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for name, dims in tensor_shapes(shape):
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out, name), os.path.join(out, final))
        weight_map.update({k: final for k in keys})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = shape_config(shape)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    return total


def write_adapter(shape: str, base_dir: str, out: str, rank: int, alpha: int, seed: int) -> int:
    """A LoRA adapter on every linear layer named in LORA_TARGETS, as PEFT saves one."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name, dims in tensor_shapes(shape):
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.split(".")[-1] in LORA_TARGETS:
            out_f, in_f = dims
            tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.002
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
               base_model_name_or_path=base_dir).save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)).save_pretrained(out)  # as training saves it beside the adapter
    return len(tensors) // 2


class Sampler(threading.Thread):
    """Peak VmHWM / RssAnon / RssFile (bytes) of one process, from /proc every `every` s."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.done = pid, every, {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}, False

    def run(self):
        while not self.done:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        key, _, rest = line.partition(":")
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(rest.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            time.sleep(self.every)


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from model.export import merge
t = time.time()
summary = merge({adapter!r}, {out!r}, base_path={base!r}, dtype={dtype!r}, max_shard_size="2GB", stream_above_gb={stream_above_gb})
print(json.dumps({{"merge_s": time.time() - t, "reference": summary["verify_reference"],
                  "max_abs_logit_diff": summary["verify_max_abs_logit_diff"]}}))
"""


def run_merge(base: str, adapter: str, out: str, stream_above_gb: float, dtype: str):
    code = CHILD.format(root=str(ROOT), adapter=adapter, out=out, base=base, stream_above_gb=stream_above_gb, dtype=dtype)
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.done = True
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"the merge failed (exit {proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1]), sampler.peak, time.time() - t


def check_tensors(base: str, adapter: str, out: str, rank: int, alpha: int, dtype: torch.dtype, layers=(0, -1)) -> float:
    """Every base tensor present in the output with its shape; largest |merged - dtype(W + s B A)|
    over the q_proj and down_proj of the given layers (0 when the arithmetic is PEFT's)."""
    from safetensors import safe_open

    def index(d):
        if not os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
            with safe_open(os.path.join(d, "model.safetensors"), framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            return json.load(f)["weight_map"]

    def get(d, wm, key):
        with safe_open(os.path.join(d, wm[key]), framework="pt") as f:
            return f.get_tensor(key)

    wb, wo = index(base), index(out)
    if set(wb) != set(wo):
        raise SystemExit(f"merged checkpoint lacks {sorted(set(wb) - set(wo))[:3]} / has extra {sorted(set(wo) - set(wb))[:3]}")
    n_layers = max(int(k.split(".")[2]) for k in wb if k.startswith("model.layers.")) + 1
    worst = 0.0
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), framework="pt") as fa:
        for layer in layers:
            layer %= n_layers
            for mod in (f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.mlp.down_proj"):
                w = get(base, wb, mod + ".weight").float()
                a, b = fa.get_tensor(f"{PREFIX}{mod}.lora_A.weight"), fa.get_tensor(f"{PREFIX}{mod}.lora_B.weight")
                want = (w + alpha / rank * (b @ a)).to(dtype).float()
                got = get(out, wo, mod + ".weight").float()
                if got.shape != want.shape:
                    raise SystemExit(f"{mod}: merged shape {tuple(got.shape)} != {tuple(want.shape)}")
                worst = max(worst, (got - want).abs().max().item())
    return worst


def check_logits(base: str, adapter: str, out: str) -> float:
    """Tiny shapes: largest |logit| difference between the merged checkpoint and base + adapter (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 24))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return (ref(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--work", required=True, help="directory for the base, adapter and merged checkpoint (~2x the bf16 model)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shard-gb", type=float, default=5.0, help="the base's shard size")
    p.add_argument("--stream-above-gb", type=float, default=12.0, help="export.stream_above_gb for the merge")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the merged checkpoint's dtype")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    base, adapter, out = (os.path.join(a.work, d) for d in ("base", "adapter", "merged"))
    shutil.rmtree(a.work, ignore_errors=True)
    t = time.time()
    size = write_base(a.shape, base, int(a.shard_gb * 1e9), seed=0)
    base_s = time.time() - t
    say(f"random {a.shape} base: {size / 1e9:.1f} GB bf16 written in {base_s:.0f} s")
    layers = write_adapter(a.shape, base, adapter, a.rank, 2 * a.rank, seed=0)
    try:
        child, peak, wall = run_merge(base, adapter, out, a.stream_above_gb, a.dtype)
        say(f"merged in {wall:.0f} s; peak RSS {peak['VmHWM'] / 2**30:.2f} GiB, anonymous {peak['RssAnon'] / 2**30:.2f} GiB")
        result = {"shape": a.shape, "base_gb_bf16": round(size / 1e9, 2), "fp32_gb": round(2 * size / 1e9, 2),
                  "lora_layers": layers, "rank": a.rank, "dtype": a.dtype, "streamed": child["max_abs_logit_diff"] is None,
                  "merge_wall_s": round(wall, 1), "peak_rss_gib": round(peak["VmHWM"] / 2**30, 2),
                  "peak_anon_gib": round(peak["RssAnon"] / 2**30, 2), "peak_file_gib": round(peak["RssFile"] / 2**30, 2),
                  "merged_tensor_max_diff": check_tensors(base, adapter, out, a.rank, 2 * a.rank, {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]),
                  "out_gb": round(sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e9, 2),
                  "base_write_s": round(base_s, 1), "cpus": os.cpu_count()}
        if a.shape == "tiny":
            result["merged_vs_adapter_max_logit_diff"] = check_logits(base, adapter, out)
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
