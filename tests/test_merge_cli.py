"""`dialtune merge` as a command: flags outside their config key's range and an --out that cannot
be written are one sentence before anything is merged; a merge of an earlier checkpoint into the
run's merged/ says what reads it and summary.json names it; notes the export makes reach the
screen; `dialtune eval` of an export written elsewhere takes the run's config. An adapter belongs
to the base weights it was trained on: every checkpoint records the base's identity, and merging,
evaluating or resuming it on other weights at the same place (a local directory overwritten with
another checkpoint of the same shape) is one sentence, where the merge would have passed its own
check (merged == base + adapter, both on the new base)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.base_identity import changed, checkpoint_problem, identity
from tests.conftest import EXPORT_FAST, ROOT, run_env, train

pytestmark = pytest.mark.slow


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], env=run_env(), capture_output=True,
                          text=True, cwd=str(ROOT), timeout=timeout)


def test_bad_flags_and_unwritable_out_are_refused_before_merging(peft_runs, tmp_path, capsys):
    from launch.cli import main

    run = peft_runs["lora"]
    (tmp_path / "file").write_text("")
    cases = [(["--tolerance", "-1"], "--tolerance -1.0: export.verify_tolerance=-1.0 must be at least 0."),
             (["--dequantize-error", "-1"], "--dequantize-error -1.0: export.verify_dequantize_error=-1.0 must be at least 0."),
             (["--eval-conversations", "-5"], "--eval-conversations -5: export.eval_conversations=-5 must be at least 0 (0 skips)."),
             (["--out", tmp_path / "file"], f"{tmp_path / 'file'} exists and is not a directory; pass a new or empty directory"),
             (["--out", "/proc/dialtune-merge"], "the export cannot be written to /proc/dialtune-merge (")]
    for flags, said in cases:
        assert main(["merge", str(run), *map(str, flags)]) == 2, flags
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dialtune: error:")]
        assert len(errors) == 1 and said in errors[0], (flags, errors)
    assert not list(run.glob("merged.tmp")) and not list(tmp_path.glob("*.tmp"))


def test_an_earlier_checkpoint_merged_into_the_run_and_an_export_elsewhere(peft_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(peft_runs["lora"], run)
    (latest,) = (run / "checkpoints").glob("step_*")
    shutil.copytree(latest, run / "checkpoints" / "step_0000001")  # an earlier checkpoint (the same weights)
    proc = _cli("merge", run, "--checkpoint", "step_0000001", "--eval-conversations", "0", "--base", "dequantized")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"will hold step_0000001, not the run's latest checkpoint {latest.name}: `dialtune chat {run}` and "
            f"`dialtune eval {run / 'merged'}` (`dialtune eval {run}` evaluates the latest adapter) read it") in proc.stderr
    # export.base=dequantized on a full-precision run: said on the screen, not only in export_summary.json
    assert "export.base=dequantized asked for, but the run trained a full-precision base" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_checkpoint"] == str(run / "checkpoints" / "step_0000001") and summary["merged"] == str(run / "merged")
    # an export written outside the run is evaluated with the run's config (export_summary.json names the run)
    from omegaconf import OmegaConf

    from launch.evaluate import resolve

    proc = _cli("merge", run, "--checkpoint", "latest", "--out", tmp_path / "elsewhere", "--eval-conversations", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "elsewhere" / "export_summary.json").read_text())["checkpoint"] == str(run / "checkpoints" / latest.name)
    cfg, kind, _, _, _, out = resolve(str(tmp_path / "elsewhere"), [])
    saved = OmegaConf.load(run / "config.yaml")
    assert kind == "merged" and out == tmp_path / "elsewhere-eval"  # beside it: the export stays as exported
    assert cfg.data.max_seq_len == saved.data.max_seq_len == 512 and cfg.run.name == saved.run.name


def test_relative_model_and_data_paths_are_recorded_absolute(tmp_path):
    """A run started with model=<relative dir> and relative data files records them absolute: merge
    and eval from another directory found neither (a traceback looking the model up on the Hub)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import TOKENIZER_DIR, TRAIN_PY

    work = tmp_path / "work"
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(work / "bases" / "llama")
    tok.save_pretrained(work / "bases" / "llama")
    shutil.copy(ROOT / "data_pipeline" / "sample_data" / "train.jsonl", work / "mine.jsonl")
    subprocess.run([sys.executable, str(TRAIN_PY), "model=bases/llama", "model.dtype=fp32", "data=custom",
                    "data.train_files=[mine.jsonl]", "data.eval_fraction=0.1", "run.root=out", "logger=none", "train.max_steps=1",
                    "eval.at_end=[]", "export.merge_at_end=false", "train.progress_bar=false"],
                   env=run_env(), cwd=str(work), check=True, capture_output=True, timeout=300)
    run = work / "out" / "llama-lora-none"
    saved = (run / "config.yaml").read_text()
    assert f"name_or_path: {work / 'bases' / 'llama'}" in saved and f"- {work / 'mine.jsonl'}" in saved
    key = json.loads((run / "data_stats.json").read_text())["cache"]["key"]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "model=bases/llama", "data=custom",
                           "data.train_files=[mine.jsonl]", "data.eval_fraction=0.1"], env={**run_env(), "PYTHONPATH": str(ROOT)},
                          cwd=str(work), capture_output=True, text=True, timeout=300)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("cache hit: ") and last.endswith(key), proc.stderr[-2000:]  # (the key training filled)
    proc = _cli("merge", run, "--eval-conversations", "0")  # (from the project's folder, not the run's)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _cli("eval", run, "--parts", "lm")
    assert proc.returncode == 0 and (run / "eval" / "results.json").is_file(), proc.stderr[-2000:]


def _perturb(path):
    """The same file, the same size, one weight matrix changed (another fine-tune of the base)."""
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_identity_samples_the_weights_and_says_what_changed(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(1 << 20), "v": torch.zeros(1 << 16)}, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}")
    then = identity(str(base))
    assert then["tensors"] == 2 and identity(str(base)) == then and changed(then, str(base), None, "checkpoint c") is None
    # the same tensors re-saved in another order, in two shards: the same weights
    (base / "model.safetensors").unlink()
    save_file({"v": torch.zeros(1 << 16)}, str(base / "model-1.safetensors"), metadata={"format": "pt"})
    save_file({"w": torch.zeros(1 << 20)}, str(base / "model-2.safetensors"))
    assert identity(str(base)) == then
    save_file({"w": torch.zeros(1 << 20).index_fill_(0, torch.tensor([(1 << 19) + 5]), 1.0)}, str(base / "model-2.safetensors"))
    said = changed(then, str(base), None, "checkpoint c")
    assert said == (f"the base model {base} is not the one checkpoint c was trained on (2 tensors then and now, with other names, "
                    "shapes or values): an adapter on other base weights is another model; put the trained-on weights back there.")
    save_file({"u": torch.ones(8)}, str(base / "model-3.safetensors"))
    assert "(2 tensors then, 3 now)" in changed(then, str(base), None, "checkpoint c")
    assert changed(None, str(base), None, "c") is None  # a checkpoint of before the record
    assert identity(str(tmp_path / "gone")) is None and identity("no-such-org/no-such-model") is None


def test_a_changed_base_is_refused_by_merge_eval_and_resume(peft_runs, tmp_path, capsys):
    from launch.cli import main
    from model.export_run import run_base

    run = tmp_path / "run"
    shutil.copytree(peft_runs["lora"], run)
    ckpt = run / "checkpoints" / "step_0000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["base"]["tensors"] > 10
    cfg = OmegaConf.load(run / "config.yaml")
    shutil.rmtree(run / "base")  # a tiny run copied without its base/: rebuilt from its config, the same weights
    assert checkpoint_problem(str(ckpt), run_base(cfg, str(run)), cfg) is None
    _perturb(run / "base" / "model.safetensors")
    said = f"the base model {run / 'base'} is not the one checkpoint {ckpt} was trained on (" 
    for argv in (["merge", str(run), "--out", str(tmp_path / "m")], ["eval", str(run), "--parts", "lm"]):
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dialtune: error:")]
        assert len(errors) == 1 and said in errors[0], (argv, errors)
    assert not (tmp_path / "m").exists()
    proc = train(["run.name=run", "train.resume=auto", "peft=lora", "model.dtype=fp32", *EXPORT_FAST, "train.max_steps=3"],
                 tmp_path, check=False)
    assert proc.returncode == 2 and said in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
