"""bench/: the harness runs end to end on CPU (tiny shape) and prints/appends one table with both
paths; its data and table helpers behave."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_env


def test_bench_tiny_cpu_end_to_end(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    rows = tmp_path / "rows.jsonl"
    args = ["--shape", "tiny", "--layers", "1", "--device", "cpu", "--quant", "fp32", "--which", "hf,dialtune,dialtune:varlen=0,dialtune:fused_lora=1",
            "--steps", "1", "--warmup", "1", "--tokens-per-batch", "512", "--batch-size", "4", "--model-cache", str(tmp_path / "models"),
            "--append-results", "--results-file", str(results), "--jsonl", str(rows),
            "--profile", str(tmp_path / "profile.txt")]
    # one thread: two OpenMP threads on a shared 2-core machine run tiny matmuls 50x slower
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], env=run_env(1), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()  # DeepSpeed, when installed, logs a line to stdout on import
    top = lines.index("| path | quant | real tok/s | target tok/s | padded tok/s | peak GiB | MFU | vs hf |")
    hf_row, dt_row = lines[top + 2], lines[top + 3]
    assert hf_row.startswith("| hf | fp32 |") and hf_row.endswith("| 1.00 |")
    assert dt_row.startswith("| dialtune | fp32 |") and "Single process, no DeepSpeed" in proc.stdout
    recorded = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["label"] for r in recorded] == ["hf", "dialtune", "dialtune:varlen=0", "dialtune:fused_lora=1"]
    # the levers as the recipe applies them (model/levers.py, whose log lines these are): the same
    # packed rows through per-document varlen (auto on CPU) and the mask give the same loss
    assert "packed attention: varlen" in recorded[1]["notes"] and "packed attention: mask" in recorded[2]["notes"]
    assert recorded[2]["loss_first"] == pytest.approx(recorded[1]["loss_first"], rel=1e-5)
    # the fused LoRA branch: PEFT's masks and function, less kept
    assert "fused LoRA: 7 layers (every LoRA input kept once; q/k/v's" in recorded[3]["notes"]
    assert recorded[3]["loss_first"] == pytest.approx(recorded[1]["loss_first"], rel=1e-5)
    assert all(r["real_tok_s"] > 0 and 0 < r["target_tok_s"] < r["real_tok_s"] <= r["padded_tok_s"] for r in recorded)
    text = results.read_text()
    assert "· CPU · tiny, 1 layers" in text and "transformers " in text and "peft " in text
    assert "python bench/run.py --shape tiny --layers 1 --device cpu" in text and hf_row in text and dt_row in text
    # --layers: a shallow model of the shape, written beside (not over) the full-depth one
    assert [json.loads((d / "config.json").read_text())["num_hidden_layers"] for d in (tmp_path / "models").iterdir()] == [1]
    # --profile: one extra step per dialtune row, outside the measured ones, its top ops written down
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.count("## dialtune") == 3 and "aten::mm" in profile



def test_a_base_that_cannot_be_built_still_gives_the_table(tmp_path):
    """On the GPU machine a failed base build (disk full, OOM) must not lose the call's table."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    args = ["--shape", "tiny", "--device", "cpu", "--quant", "fp32,bf16", "--which", "hf,dialtune", "--steps", "1",
            "--model-cache", str(blocker / "models"), "--append-results", "--results-file", str(results)]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], env=run_env(1), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| hf |", "| dialtune |"))]
    assert len(rows) == 4 and all("failed: building the tiny base" in r for r in rows), proc.stdout + proc.stderr[-2000:]
    assert "failed: building the tiny base" in results.read_text()

def test_which_parsing_and_row_order():
    from bench.run import parse_which, plan_rows

    which = parse_which("hf,int8/dialtune:fast_int8=0,dialtune,dialtune:fused_ce=0:ckpt=2")
    assert which == [("hf", "hf", {}, None), ("dialtune:fast_int8=0", "dialtune", {"fast_int8": 0}, "int8"),
                     ("dialtune", "dialtune", {}, None),
                     ("dialtune:fused_ce=0:ckpt=2", "dialtune", {"fused_ce": 0, "ckpt": 2}, None)]
    # every unpinned item per quant, quant by quant; then the pinned lever rows (skipped first when time runs short)
    assert [(q, label) for q, label, _, _ in plan_rows(which, ["int8", "bf16"])] == [
        ("int8", "hf"), ("int8", "dialtune"), ("int8", "dialtune:fused_ce=0:ckpt=2"),
        ("bf16", "hf"), ("bf16", "dialtune"), ("bf16", "dialtune:fused_ce=0:ckpt=2"), ("int8", "dialtune:fast_int8=0")]
    assert ("int8", "dialtune:fast_int8=0") not in [(q, label) for q, label, _, _ in plan_rows(which, ["bf16"])]
    assert parse_which("bf16/dialtune:budget=auto") == [("dialtune:budget=auto", "dialtune", {"budget": "auto"}, "bf16")]
    for bad in ("hf:liger=0", "dialtune:warp=1", "dialtune:liger=yes", "trl", "int4/dialtune", "bf16/hf:liger=0",
                "dialtune:ckpt=auto"):
        with pytest.raises(ValueError):
            parse_which(bad)


def test_table_ratios_and_failed_rows():
    from bench.run import table

    row = dict(real_tok_s=1000.0, target_tok_s=500.0, padded_tok_s=2000.0, peak_gib=40.0, mfu=0.05)
    text = table([{"label": "hf", "path": "hf", "quant": "int8", **row},
                  {"label": "dialtune", "path": "dialtune", "quant": "int8", **row, "real_tok_s": 3000.0, "peak_gib": None},
                  {"label": "dialtune", "path": "dialtune", "quant": "nf4", "error": "failed: OutOfMemoryError: a|b"}])
    lines = text.splitlines()
    assert lines[2] == "| hf | int8 | 1,000 | 500 | 2,000 | 40.0 | 5.0% | 1.00 |"
    assert lines[3] == "| dialtune | int8 | 3,000 | 500 | 2,000 | - | 5.0% | 3.00 |"
    assert lines[4].startswith("| dialtune | nf4 | failed: OutOfMemoryError: a/b |")


def test_conversation_stream_is_prefix_stable_with_a_realistic_target_share():
    from bench.common import conversations

    a = conversations("bundled", 512, 1000, 40, seed=3)
    b = conversations("bundled", 512, 1000, 400, seed=3)
    assert a == b[:40]
    lengths = [len(c["input_ids"]) for c in b]
    targets = sum(sum(1 for t in c["labels"] if t != -100) for c in b)
    assert max(lengths) <= 512 and 150 < sum(lengths) / len(b) < 400 and 0.4 < targets / sum(lengths) < 0.75
    assert all(0 <= t < 1000 for c in b for t in c["input_ids"])
    fallback = conversations("lognormal", 2048, 1000, 200, seed=3)
    assert 250 < sum(len(c["input_ids"]) for c in fallback) / 200 < 500


def test_dialtune_rows_pack_a_prefix_of_the_stream():
    from bench.common import conversations
    from bench.dialtune_path import LEVERS, _batches

    spec = dict(warmup=1, steps=2, batch_size=4, tokens_per_batch=1024, pack_len=512, max_len=512, lengths="bundled", seed=0)
    batches = _batches(spec, dict(LEVERS), 1000, torch.float32)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] <= 512 for b in batches)
    heads = []
    for b in batches:
        assert sum(b["lengths"]) == int((b["input_ids"] != 0).sum())  # token ids are >= 3, padding is 0
        assert b["attention_mask"].dtype == torch.bool
        for row, pos in zip(b["input_ids"].tolist(), b["position_ids"].tolist()):
            heads += [tuple(row[i:i + 4]) for i, p in enumerate(pos) if p == 0 and row[i] != 0]
    n = len(heads)
    assert n == sum(len(b["lengths"]) for b in batches)
    # the packed conversations are the head of the stream the hf path reads, less a few left over
    stream = {tuple(c["input_ids"][:4]) for c in conversations("bundled", 512, 1000, n + 4, 0)}
    assert set(heads) <= stream
    fill = sum(sum(b["lengths"]) for b in batches) / (len(batches) * 2 * 512)
    assert fill > 0.8


def test_merge_tolerance_tiny_cpu(tmp_path):
    """bench/merge_tolerance.py (the measurement behind the dequantized merge's checks) runs end
    to end: per quantization, the merge arithmetic is exact, every dequantized layer is within the
    export's limit, and the dequantized merge is closer to the quantized model than the original."""
    from model.export import DEQUANTIZE_ERROR

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_tolerance.py"), "--shape", "tiny", "--device", "cpu",
                           "--model-cache", str(tmp_path / "models"), "--conversations", "2"],
                          env=run_env(1), cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["quant"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"shape"'))}
    assert sorted(rows) == ["int8", "llm-int8", "nf4"]
    for r in rows.values():
        assert r["merge_arithmetic_max_abs_diff"] <= 1e-4 and r["dequantize_max_rel_error"] < DEQUANTIZE_ERROR
        assert r["mean_abs_diff_dequantized"] < r["mean_abs_diff_original"] and r["adapter_effect_max"] > 0
    assert rows["llm-int8"]["dequantize_max_rel_error"] > rows["int8"]["dequantize_max_rel_error"]  # int8 activations


def test_merge_memory_tiny_cpu(tmp_path):
    """bench/merge_memory.py (the 8B-on-24-GB merge measurement) runs end to end on the tiny shape
    through the streaming merge: its random adapter is in PEFT's layout (PEFT loads it and the
    merged checkpoint reproduces base + adapter logits in fp32), every tensor is written, and the
    child's memory was sampled."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_memory.py"), "--shape", "tiny", "--work", str(tmp_path / "w"),
                           "--stream-above-gb", "0", "--dtype", "fp32"],
                          env=run_env(1), cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["streamed"] and r["lora_layers"] == 14 and r["merged_tensor_max_diff"] == 0.0
    assert r["merged_vs_adapter_max_logit_diff"] <= 1e-4
    assert 0 < r["peak_anon_gib"] <= r["peak_rss_gib"]
    assert not (tmp_path / "w").exists()
