"""End to end on CPU with the real stack: the deepspeed launcher, 2 ranks (gloo), ZeRO-2, LoRA
on the embedded tiny model, bundled data, W&B offline, merged checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_env, train, train_losses
from tests.wandb_history import history

pytestmark = pytest.mark.slow
STEPS = 12


_SHM = Path("/dev/shm")
_SHM_BEFORE: set = set()


def _shm_workspaces() -> set:
    return {p.name for p in _SHM.glob("deepspeed_allreduce_buffer_*")} if _SHM.is_dir() else set()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    _SHM_BEFORE.update(_shm_workspaces())
    proc = train(["recipe=demo", f"train.max_steps={STEPS}", "eval.every_n_steps=6", "train.save_every=6",
                  "export.eval_conversations=8", "kernels.peak_tflops=0.002"],
                 root, nproc=2)
    return root / "demo", proc


def test_two_ranks_ran_and_loss_goes_down(demo_run):
    run_dir, proc = demo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["target_tokens_seen"] == sum(r["perf/target_tokens"] for r in read_metrics(run_dir) if "perf/target_tokens" in r)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step is in the metrics file
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert sum(last) / 3 < sum(first) / 3 - 0.1, losses
    evals = [r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert "training finished" in proc.stdout and str(run_dir / "merged") in proc.stdout
    assert f"dialtune report {run_dir}" in proc.stdout
    assert f"wandb sync {run_dir / 'wandb' / 'offline-run-*'}" in proc.stdout  # every job's part of a resumed run


def test_launch_output_has_no_library_chatter(demo_run):
    """What the deepspeed launcher and DeepSpeed print per run that nobody acts on stays out of the
    output (the launcher's INFO lines and no-hostfile warning, setuptools' gcc probe lines, the
    comm op's "built successfully" per rank); the final eval shows the LM table once."""
    run_dir, proc = demo_run
    out = proc.stdout + proc.stderr
    for chatter in ("Unable to find hostfile", "WORLD INFO DICT", "CUDA_VISIBLE_DEVICES=", "compilers.C", "gcc ",
                    "built successfully", "exits successfully"):
        assert chatter not in out, chatter
    assert out.count(f"eval at step {STEPS}:") == 1 and out.count("held-out LM (target tokens)") == 2, out


def test_no_shared_memory_left_behind(demo_run):
    """DeepSpeed's CPU backend creates a 67 MB /dev/shm workspace per rank and never unlinks it;
    train/distributed.py releases the names once all ranks have mapped them."""
    run_dir, proc = demo_run
    if not _SHM.is_dir():
        pytest.skip("no /dev/shm")
    # DeepSpeed has its shared-memory allreduce built (it uses it for CPU ranks on one node): the workspaces existed
    from torch.utils.cpp_extension import _get_build_directory

    assert any(f.endswith(".so") for f in os.listdir(_get_build_directory("deepspeed_shm_comm", False)))
    left = _shm_workspaces() - _SHM_BEFORE
    assert not left, f"the run left {sorted(left)} in /dev/shm"


def test_metrics_have_what_the_readme_promises(demo_run):
    run_dir, _ = demo_run
    for row in read_metrics(run_dir):
        for key in ("step", "train/loss", "train/lr", "train/grad_norm", "perf/target_tok_s", "perf/target_tokens",
                    "perf/tok_s", "mem/rss_gb"):
            assert key in row, key
        # real target tokens never exceed the non-pad tokens, which never exceed the padded ones
        assert 0 < row["perf/target_tokens"] < row["perf/tokens"] <= row["perf/padded_tokens"]
        # MFU = model FLOPs per second per rank / the peak given (no GPU: no table entry)
        assert row["perf/model_tflops_per_device"] > 0
        assert row["perf/mfu"] == pytest.approx(row["perf/model_tflops_per_device"] / 0.002)


def test_wandb_offline_history_matches_jsonl(demo_run):
    run_dir, _ = demo_run
    rows = [r for r in history(run_dir / "wandb") if "train/loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, STEPS + 1))
    jsonl = train_losses(run_dir)
    for r in rows:
        assert r["train/loss"] == pytest.approx(jsonl[r["_step"]], rel=1e-12)
    assert any("eval/loss" in r for r in history(run_dir / "wandb"))


def _held_out_batch(tok):
    lines = (ROOT / "data_pipeline" / "sample_data" / "eval.jsonl").read_text().splitlines()[:4]
    texts = [tok.apply_chat_template(json.loads(l)["messages"], tokenize=False) for l in lines]
    return tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=200, add_special_tokens=False)


def _assert_merged_matches(run_dir, merged_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(merged_dir)
    batch = _held_out_batch(tok)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, run_dir / "checkpoints" / f"step_{STEPS:07d}" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = adapter_model(**batch).logits, merged(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (want - got).abs()[mask].max().item() <= 1e-4
    # the adapter did something (otherwise the comparison above proves nothing)
    with adapter_model.disable_adapter(), torch.no_grad():
        base_logits = adapter_model(**batch).logits
    assert (want - base_logits).abs().max().item() > 1e-3
    gen = GenerationConfig.from_pretrained(merged_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos
    assert any(Path(merged_dir).glob("*.safetensors"))


def test_merged_checkpoint_equals_base_plus_adapter(demo_run):
    run_dir, _ = demo_run
    _assert_merged_matches(run_dir, run_dir / "merged")


def test_dialtune_merge_cli(demo_run, tmp_path):
    run_dir, _ = demo_run
    out = tmp_path / "merged_cli"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "merge", str(run_dir), "--out", str(out)],
                          env=run_env(), capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_merged_matches(run_dir, out)
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["verify_max_abs_logit_diff"] <= 1e-4


def test_token_weighted_loss_is_invariant_to_ranks_and_accumulation(demo_run, tmp_path):
    """2 ranks x micro 4 x accum 2 == 1 rank x micro 4 x accum 4 == 1 rank x micro 2 x accum 8:
    the same 16 conversations per step, so with loss normalised by target tokens across
    micro-batches and ranks the per-step losses and gradient norms agree (fp32; the only
    differences are summation order and padding shape, ~1e-6 relative)."""
    run_dir, _ = demo_run
    common = ["recipe=demo", f"train.max_steps={STEPS}", "logger=none", "export.merge_at_end=false",
              "eval.every_n_steps=0", "eval.at_end=[lm]", "data.eval_files=[]"]
    # one process, a Hydra multirun: micro 4 (accumulation 4) then micro 2 (accumulation 8)
    train(["-m"] + common + ["run.name=ab", "train.global_batch_size=16", "train.micro_batch_size=4,2"], tmp_path)
    for job, gas in (("0", 4), ("1", 8)):  # train.global_batch_size derives the accumulation
        s = json.loads((tmp_path / "ab-sweep" / job / "summary.json").read_text())
        assert (s["grad_accum"], s["global_batch_size"]) == (gas, 16)
        assert f"grad_accum: {gas}\n" in (tmp_path / "ab-sweep" / job / "config.yaml").read_text()  # (a resume compares with it)
    ref = read_metrics(run_dir)
    for other in (read_metrics(tmp_path / "ab-sweep" / "0"), read_metrics(tmp_path / "ab-sweep" / "1")):
        for r, o in zip(ref, other):
            assert o["step"] == r["step"] and o["perf/target_tokens"] == r["perf/target_tokens"]
            assert o["train/loss"] == pytest.approx(r["train/loss"], rel=1e-5, abs=1e-6)
            assert o["train/grad_norm"] == pytest.approx(r["train/grad_norm"], rel=1e-4)


def test_zero_stages_give_the_same_loss_curve(demo_run, tmp_path):
    """ZeRO 0/1/3 reproduce the ZeRO-2 run's per-step losses and gradient norms. Same math in fp32;
    only the reduction order differs (bucketed all-reduce vs reduce-scatter, partitioned
    optimizer steps), which moves results by ~1e-7 relative per step, so 12 Adam steps stay within
    1e-5 relative (observed ~1e-6).
    ZeRO-3 runs with a persistence threshold of 0, so every LoRA tensor is partitioned: its saved
    adapter must still hold whole tensors (gathered before saving; an ungathered save writes
    shape-(0,) ones)."""
    from safetensors.torch import load_file

    run_dir, _ = demo_run
    ref = read_metrics(run_dir)
    # one 2-rank launch, a Hydra multirun over the stages (jobs 0, 1, 2 = ZeRO 0, 1, 3)
    train(["-m", "recipe=demo", f"train.max_steps={STEPS}", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0",
           "eval.at_end=[lm]", "data.eval_files=[]", "deepspeed=zero0,zero1,zero3", "deepspeed.stage3_param_persistence_threshold=0",
           "run.name=z"], tmp_path, nproc=2, via="torchrun")
    for job, stage in enumerate((0, 1, 3)):
        assert f"stage: {stage}" in (tmp_path / "z-sweep" / str(job) / "config.yaml").read_text()
        for r, o in zip(ref, read_metrics(tmp_path / "z-sweep" / str(job))):
            assert o["step"] == r["step"]
            assert o["train/loss"] == pytest.approx(r["train/loss"], rel=1e-5), stage
            assert o["train/grad_norm"] == pytest.approx(r["train/grad_norm"], rel=1e-4), stage
    tensors = load_file(str(tmp_path / "z-sweep" / "2" / "checkpoints" / f"step_{STEPS:07d}" / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 4 * 7 * 2  # A and B for the 7 linears of 4 layers
    assert all(t.numel() > 0 and 16 in t.shape for t in tensors.values())  # rank 16


def test_bf16_without_zero_trains_as_with_zero(tmp_path):
    """bf16 under ZeRO-0 wraps the optimizer in DeepSpeed's FP16_UnfusedOptimizer, whose constructor
    runs one AdamW step on zero gradients: Adam's bias correction then made the first real update
    0.74x as large and AdamW's weight decay shrank the weights once (the step-2 loss was 1e-3 off).
    dialtune holds that step at lr 0 and drops its states: ZeRO-0 and ZeRO-2 give the same curve."""
    train(["-m", "recipe=demo", "deepspeed=zero0,zero2", "model.dtype=bf16", "train.max_steps=3", "optim.weight_decay=0.1",
           "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0", "eval.at_end=[]", "data.eval_files=[]",
           "run.name=bf16"], tmp_path)
    zero0, zero2 = (read_metrics(tmp_path / "bf16-sweep" / str(job)) for job in (0, 1))
    assert [r["step"] for r in zero0] == [r["step"] for r in zero2] == [1, 2, 3]
    for a, b in zip(zero0, zero2):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5), a["step"]


def test_a_resumed_job_continues_its_wandb_run(tmp_path):
    """A requeued / resumed job logs into the W&B run of the job before it (same id, resume
    allowed), a fresh start into a new one; a sweep's runs are named and grouped by sweep."""
    from omegaconf import OmegaConf

    from train.metrics import Metrics

    logger = OmegaConf.create({"backend": "wandb", "mode": "offline", "project": "dialtune-test", "entity": None, "tags": []})
    run = tmp_path / "lr-sweep" / "0"
    run.mkdir(parents=True)

    def job(resume_step, steps):
        m = Metrics(str(run), logger, {}, True, resume_step=resume_step)
        for s in steps:
            m.log({"train/loss": float(s)}, s)
        wb = m.wandb_run
        m.close()
        return wb.id, wb.name, wb.group

    first, requeued, fresh = job(None, [1, 2, 3]), job(2, [3, 4]), job(None, [1])
    assert first == requeued == (first[0], "lr-sweep/0", "lr-sweep")
    assert fresh[0] != first[0]
    # offline-run-<time>-<id>, and -<n> after it for a second folder of one id within one second
    ids = sorted(p.name.split("-")[3] for p in (run / "wandb").glob("offline-run-*"))
    assert ids == sorted([first[0], first[0], fresh[0]]), sorted(p.name for p in (run / "wandb").glob("offline-run-*"))


def test_a_dead_wandb_service_turns_wandb_off_not_the_training(tmp_path, caplog):
    """SLURM's scancel signals every process of the step, W&B's service (wandb-core) too, while the
    rank is saving: the next log must not end the job in a traceback; metrics.jsonl goes on."""
    import psutil
    from omegaconf import OmegaConf

    from tests.conftest import read_metrics
    from train.metrics import Metrics

    logger = OmegaConf.create({"backend": "wandb", "mode": "offline", "project": "dialtune-test", "entity": None, "tags": []})
    m = Metrics(str(tmp_path), logger, {}, True)
    m.log({"train/loss": 1.0}, 1)
    service = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline()).lower()]
    assert service, "no W&B service process"
    for p in service:
        p.kill()
    psutil.wait_procs(service, timeout=10)
    with caplog.at_level("WARNING", logger="dialtune"):
        for step in (2, 3):
            m.log({"train/loss": float(step)}, step)
            m.summary({"x": step})
        m.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert sum("W&B stopped working" in r.message for r in caplog.records) == 1 and m.wandb_run is None


def test_wandb_auto_mode_follows_wandb_login_and_wandb_mode(monkeypatch, tmp_path):
    """logger.mode=auto is online for a user who ran `wandb login` (a netrc entry, no WANDB_API_KEY),
    and keeps a WANDB_MODE the user exported (wandb.init's mode argument would override it)."""
    from train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("auto", {}) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_mode("auto", {}) == "online"
    assert wandb_mode("auto", {"WANDB_MODE": "offline"}) == "offline" and wandb_mode("auto", {"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_mode("auto", {"WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("offline", {"WANDB_MODE": "online"}) == "offline"  # an explicit logger.mode is what it says
