"""Shared fixtures. Tests never touch the network: the tiny tokenizer is committed
(model/tiny/tokenizer, built from local text by model/tiny/build_tokenizer.py) and models are
random, built from a transformers config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")
os.environ.pop("WANDB_API_KEY", None)
TRAIN_PY = ROOT / "launch" / "train.py"
TOKENIZER_DIR = ROOT / "model" / "tiny" / "tokenizer"

# The files that take longest (real 2-rank runs, the SLURM cluster), started first: with two
# workers (pytest-xdist, a file per worker at a time) none of them is left to run alone at the end.
LONGEST_FIRST = ("test_slurm_cluster.py", "test_e2e.py", "test_preemption.py", "test_resume.py", "test_robustness.py",
                 "test_full_finetune.py", "test_eval.py", "test_export.py", "test_resume_layout.py", "test_merge_cli.py")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(LONGEST_FIRST)))  # (stable: the rest as collected)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def run_env(threads: int = 2) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT)
    return env


def torchrun_command(args, nproc):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(port), str(TRAIN_PY), *args]


def train(overrides, root, nproc=1, timeout=600, check=True, via="deepspeed", extra_env=None):
    """Run launch/train.py (python for 1 rank; for more, the deepspeed launcher, or torchrun,
    which starts ~7 s faster and runs the same DeepSpeed engine); returns the CompletedProcess.
    Quiet defaults: no progress bar, no W&B unless the caller asks; the held-out LM eval reads 2
    micro-batches per rank and the response eval 4 conversations (the whole eval set, with the base
    comparison, cost a run more than its steps: 17 s for the int8 recipe on CPU), unless the
    caller's overrides say otherwise (the last value wins)."""
    args = [f"run.root={root}", "train.progress_bar=false", "eval.lm_max_batches=2", "eval.response_conversations=4", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN_PY), *args]
        env = run_env(2)
    elif via == "torchrun":
        cmd, env = torchrun_command(args, nproc), run_env(1)
    else:
        from launch import name_cpu_accelerator
        from launch.cli import launch_command

        cmd = launch_command(args, nproc)
        env = run_env(1)
        name_cpu_accelerator(env)  # as `dialtune train` does for the launcher (launch/train.py does it for each rank)
    proc = subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    said = proc.stdout + proc.stderr
    assert "unable to detect it" not in said, "DeepSpeed's accelerator warning on a CPU run"
    assert "FutureWarning: `is_gradient_checkpointing`" not in said and "all_gather_into_tensor` is deprecated" not in said
    assert "reduce_scatter_tensor` is deprecated" not in said
    return proc


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


# Two-step runs with a large learning rate (optim.lr=5e-2, peft.dropout=0) so that the adapter
# moves the logits by ~1: test_export compares merges with them, test_chat talks to them.
EXPORT_FAST = ["train.max_steps=2", "data.max_seq_len=512", "eval.at_end=[lm]", "train.micro_batch_size=2",
               "train.grad_accum=1", "logger=none", "optim.lr=5e-2", "peft.dropout=0", "export.eval_conversations=8"]
PEFTS = ["lora", "dora", "rslora"]


def sweep_runs(root, name, values_key):
    """{value: run_dir} of a Hydra multirun, read back from each job's config.yaml."""
    from omegaconf import OmegaConf

    out = {}
    for job in sorted((root / f"{name}-sweep").iterdir()):
        if (job / "config.yaml").is_file():
            out[OmegaConf.select(OmegaConf.load(job / "config.yaml"), values_key)] = job
    return out


@pytest.fixture(scope="session")
def peft_runs(tmp_path_factory):
    """{method: run_dir} for lora, dora and rslora, each with its merged/ checkpoint (fp32)."""
    root = tmp_path_factory.mktemp("export_peft")
    train(["-m", "peft=" + ",".join(PEFTS), "run.name=peft", "model.dtype=fp32"] + EXPORT_FAST, root)
    runs = sweep_runs(root, "peft", "peft.method")
    assert sorted(runs) == sorted(PEFTS)
    return runs
