"""The command line as a user meets it: clear one-sentence errors, Hydra overrides that work
under every launcher, quantized recipes on CPU."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_metrics, train

QUICK = ["train.max_steps=2", "data.max_seq_len=512", "eval.at_end=[lm]", "train.micro_batch_size=2", "logger=none", "export.eval_conversations=8"]


def _one_sentence_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.startswith("dialtune: error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("overrides,fragment", [
    (["quant=int8", "deepspeed=zero3"], "ZeRO-3"),
    (["data.train_files=[/no/such/file.jsonl]"], "data.train_files[0]: file '/no/such/file.jsonl' does not exist"),
    # a mistyped key without `+`: the nearest real key, not Hydra's advice to add it with `+`
    (["train.max_stepz=3"], "train.max_stepz is not a config key (did you mean train.max_steps?)"),
    (["recipe=lora_fp16"], "Could not find 'recipe/lora_fp16' (Available options in 'recipe': demo,"),
    (["model=llama3_8bb"], "model=llama3_8bb is no config in conf/model (did you mean model=llama3_8b?)"),  # not a minute of hub retries
    (["optimizer=adamw"], "optimizer is not a config key (did you mean the config group optim=<adamw|"),
    (["model=/no/such/model"], "model.name_or_path='/no/such/model' is not a directory"),
    (["model=acme/not-in-any-cache"], "model.name_or_path='acme/not-in-any-cache' is no local directory (relative paths are "
                                      f"taken from {ROOT}), and as a hub id it is not in the local Hugging Face cache, which "
                                      "HF_HUB_OFFLINE=1 keeps it from downloading: download it first (`hf download acme/not-in-any-cache`)"),
    # refused once the data and the tiny base are there (config.yaml written): no run directory either
    (["train.grad_accum=4096"], "fewer than one optimizer step needs (micro_batch_size 2 x grad_accum 4096"),
])
def test_impossible_config_exits_with_one_sentence(tmp_path, overrides, fragment):
    _one_sentence_error(train(overrides + QUICK, tmp_path, check=False), fragment)
    assert list(tmp_path.iterdir()) == []  # no run directory of Hydra's record alone is left behind


@pytest.mark.parametrize("command", ["demo", "train"])
def test_the_launching_commands_say_a_config_error_before_starting_ranks(tmp_path, command):
    """`dialtune demo` and `dialtune train --nproc 2` check the config before the deepspeed
    launcher starts: the sentence alone, not under the launcher's and every rank's start-up lines."""
    import subprocess
    import sys

    from tests.conftest import ROOT, run_env

    proc = subprocess.run([sys.executable, "-m", "launch.cli", command, "--nproc", "2", "train.max_stepz=3",
                           f"run.root={tmp_path}"], env=run_env(1), capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    _one_sentence_error(proc, "train.max_stepz is not a config key (did you mean train.max_steps?)")
    assert "deepspeed" not in proc.stdout.lower() + proc.stderr.lower() and not list(tmp_path.iterdir())


def test_the_early_config_check_keeps_lists_and_checks_a_sweeps_first_job(tmp_path):
    """What launch/train.py, demo and train check before Hydra or the launcher: a list value is one
    job's value (not a sweep), a sweep is checked by its first job's values, Hydra's own keys are
    Hydra's, and the --local_rank=N the deepspeed launcher appends does not switch the check off."""
    from launch.prepare import override_problem, plain_overrides
    from tests.data_helpers import GOOD, jsonl

    assert plain_overrides(["-m", "optim.lr=1e-4,2e-4", "train.seed=choice(1,2)", "data.train_files=[a.jsonl,b.jsonl]",
                            "hydra.job.env_set.FOO=1", "hydra/job_logging=disabled"]) == \
        ["optim.lr=0.0001", "train.seed=1", "data.train_files=[a.jsonl,b.jsonl]"]
    a, b = jsonl(tmp_path / "a.jsonl", GOOD[:3]), jsonl(tmp_path / "b.jsonl", GOOD[3:])
    assert override_problem(["data=custom", f"data.train_files=[{a},{b}]", "hydra.job.env_set.FOO=1"], validate=True) is None
    assert override_problem(["-m", "data=custom", f"data.train_files=[{a},{b}]", "optim.lr=1e-4,2e-4"], validate=True) is None
    assert "(did you mean train.max_steps?)" in override_problem(["--local_rank=0", "train.max_stepz=3"])


def test_dialtune_train_takes_a_sweeps_m_anywhere(capsys):
    """`dialtune train -m ...` (as README's `python launch/train.py -m ...`) is a sweep, not an
    unrecognized argument; checked by its first job like any other."""
    from launch.cli import main

    for argv in (["-m", "optim.lr=1e-4,2e-4", "quant=int4"], ["optim.lr=1e-4,2e-4", "--multirun", "quant=int4"]):
        assert main(["train", "--nproc", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" not in err and "quant=int4" in err and err.count("dialtune: error:") == 1, err


def test_sweeps_are_checked_at_submission_job_by_job():
    """A comma list without -m would stop the job with Hydra's 'Ambiguous value'; with -m, a typo in
    a swept key, a bad value or a combination that cannot run in any job is found before anything
    is queued (not after the jobs before it trained), naming the job."""
    from launch.prepare import override_problem, plain_overrides

    assert override_problem(["optim.lr=1e-3,2e-3"]).startswith("optim.lr=1e-3,2e-3 lists several values, which Hydra runs "
                                                                "one job each only with -m")
    assert "optim.lrr is not a config key (did you mean optim.lr?)" in override_problem(["-m", "optim.lrr=1e-3,2e-3"])
    assert "Value 'abc'" in override_problem(["-m", "optim.lr=abc,1e-3"])
    assert override_problem(["-m", "train.micro_batch_size=0,1"], validate=True) == "train.micro_batch_size=0 must be at least 1."
    assert override_problem(["-m", "optim.lr=1e-3,2e-3", "peft=lora,dora", "data.train_files=[a.jsonl,b.jsonl]"]) is None
    assert override_problem(["-m", "optim.lr=1e-4,2e-4", "train.micro_batch_size=1,0"], validate=True) == \
        "sweep job 1 of 4 (train.micro_batch_size=0): train.micro_batch_size=0 must be at least 1."
    assert override_problem(["-m", "quant=none,int8", "deepspeed=zero2,zero3"], validate=True).startswith(
        "sweep job 3 of 4 (quant=int8, deepspeed=zero3): quant=int8 cannot be sharded by ZeRO-3")
    assert override_problem(["-m", "data.packing=true,2"], validate=True) == "sweep job 1 of 2 (data.packing=2): data.packing=2 is not a boolean: use true or false."
    assert override_problem(["-m", "peft=glob(*)"], validate=True) is None  # (no first value: Hydra's own business)
    assert plain_overrides(["-m", "peft=lora,dora", "data.seed=range(3)", "hydra.job.chdir=true"]) == ["peft=lora", "data.seed=0"]


def test_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}\n')
    proc = train([f"data.train_files=[{bad}]", "data.eval_files=[]"] + QUICK, tmp_path, check=False)
    _one_sentence_error(proc, f"{bad}:3: messages[1] has role 'bot'")


def test_a_bad_intent_file_stops_before_training(tmp_path):
    """eval.intent_files are read when the run starts: a file of the wrong kind used to surface
    only after the last step, and the run then ended without its final checkpoint."""
    wrong = tmp_path / "not_intents.jsonl"
    wrong.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    proc = train(QUICK + [f"eval.intent_files=[{wrong}]", "eval.at_end=[lm,intent]", "data.eval_files=[]"], tmp_path, check=False)
    _one_sentence_error(proc, f"{wrong}:1:")
    assert not list(tmp_path.rglob("metrics.jsonl")) or not any(
        p.read_text().strip() for p in tmp_path.rglob("metrics.jsonl"))  # no step ran


def test_multirun_local_rank_and_plus_override(tmp_path):
    """`-m` sweeps, the launcher's --local_rank=N, and `+key=value` all go through Hydra. The runs
    are sized by epochs (train.max_steps=-1, the default): 10 conversations, micro-batches of 2,
    2 epochs = 10 optimizer steps, the cosine schedule run over those 10."""
    from tests.conftest import ROOT

    small = tmp_path / "ten.jsonl"
    small.write_text("".join((ROOT / "data_pipeline" / "sample_data" / "train.jsonl").read_text().splitlines(True)[:10]))
    train(["-m", "--local_rank=0", "optim.lr=1e-3,2e-3", "+deepspeed.extra.steps_per_print=1000",
           "export.merge_at_end=false", "data.eval_files=[]", "run.name=sweep"] + QUICK
          + ["train.max_steps=-1", "train.epochs=2", f"data.train_files=[{small}]", "optim.warmup_steps=0", "optim.warmup_ratio=0"],
          tmp_path)
    lrs = []
    for job in ("0", "1"):
        run_dir = tmp_path / "sweep-sweep" / job
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, 11))
        assert [r["train/epoch"] for r in rows][4::5] == [1.0, 2.0]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["finished"] and summary["total_steps"] == 10
        assert rows[-1]["train/lr"] < rows[0]["train/lr"] / 5  # cosine over the 10 steps the epochs make
        lrs.append((run_dir / "config.yaml").read_text())
    assert "lr: 0.001" in lrs[0] and "lr: 0.002" in lrs[1]
    assert "steps_per_print: 1000" in lrs[0]


def test_model_override_with_a_local_path(tmp_path):
    """model=<dir> (not a conf/model option) means that model: here the tiny base, written as a run
    writes it."""
    from hydra import compose, initialize_config_dir

    from model.loader import build_tiny, load_tokenizer
    from train.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        model_cfg = compose(config_name="train").model
    base = tmp_path / "first" / "base"
    build_tiny(model_cfg, load_tokenizer(model_cfg), str(base))
    train([f"model={base}", "model.dtype=fp32", "model.gradient_checkpointing=true", "run.name=second",
           "kernels.memory_budget_gib=20", "export.merge_at_end=false"] + QUICK, tmp_path)
    cfg = (tmp_path / "second" / "config.yaml").read_text()
    assert f"name_or_path: {base}" in cfg and "gradient_checkpointing: true" in cfg
    # the memory budget plans on CUDA only: on CPU every decoder layer still recomputes
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["checkpointed_layers"] == 4
    assert len(read_metrics(tmp_path / "second")) == 2


def test_quantized_recipes_train_packed_on_cpu(tmp_path):
    """recipe=lora_int8 and qlora_nf4 as shipped (packed rows, real bitsandbytes on CPU), one Hydra
    multirun; their merges are tested in test_export.py."""
    train(["-m", "recipe=lora_int8,qlora_nf4", "train.grad_accum=1", "run.name=q", "export.merge_at_end=false"] + QUICK, tmp_path)
    for job, kind in enumerate(("int8", "nf4")):
        run_dir = tmp_path / "q-sweep" / str(job)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert f"mode: {kind}" in (run_dir / "config.yaml").read_text()
        assert summary["quantized_linear_layers"] == 4 * 7  # every linear of the 4 decoder layers
        assert summary["packed_attention"] == "varlen"  # auto on CPU: SDPA per document
        rows = read_metrics(run_dir)
        assert len(rows) == 2 and all(r["train/loss"] == r["train/loss"] for r in rows)  # finite


def test_packed_training_runs_and_fills_rows(tmp_path):
    """Packed rows through the recipe, both boundary-safe attention paths in one Hydra multirun
    (job 0: the 4D mask, job 1: varlen per document): same data, same losses."""
    train(["-m", "data.packing=true", "run.name=packed", "export.merge_at_end=false",
           "kernels.packed_attention=mask,varlen"] + QUICK, tmp_path)
    runs = [tmp_path / "packed-sweep" / str(job) for job in (0, 1)]
    stats = json.loads((runs[0] / "data_stats.json").read_text())
    assert stats["packing"]["fill_ratio"] > 0.9 and stats["packing"]["docs_per_row"] > 1.5
    assert [json.loads((r / "summary.json").read_text())["packed_attention"] for r in runs] == ["mask", "varlen"]
    mask, varlen = (read_metrics(r) for r in runs)
    assert len(mask) == 2 and all(r["train/loss"] == r["train/loss"] for r in mask)
    # packed rows are nearly full: little padding
    assert all(r["perf/tokens"] / r["perf/padded_tokens"] > 0.85 for r in mask)
    for m, v in zip(mask, varlen):
        assert v["perf/target_tokens"] == m["perf/target_tokens"]
        assert v["train/loss"] == pytest.approx(m["train/loss"], rel=1e-5)
        assert v["train/grad_norm"] == pytest.approx(m["train/grad_norm"], rel=1e-4)
    # the end-of-training eval (unpacked, on the model's own attention) sees the same model
    ends = [json.loads((r / "summary.json").read_text())["eval/loss"] for r in runs]
    assert ends[1] == pytest.approx(ends[0], rel=1e-5)


def test_launcher_keeps_the_gpus_made_visible(monkeypatch, capsys):
    """deepspeed --num_gpus N would drop CUDA_VISIBLE_DEVICES and use physical GPUs 0..N-1 (a
    shared node's other jobs' GPUs): visible GPUs are named with --include instead."""
    from launch.cli import LaunchError, launch_command, main

    monkeypatch.setattr("launch.cli._cuda_count", lambda: 8)  # a GPU node (on a CPU machine the variable is ignored)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    cmd = launch_command(["a=1"], 2)
    assert cmd[cmd.index("--include") + 1] == "localhost:2,3" and "--num_gpus" not in cmd
    with pytest.raises(LaunchError, match="only 3 GPU"):
        launch_command(["a=1"], 4)
    assert main(["train", "--nproc", "4", "a=1"]) == 2
    assert "CUDA_VISIBLE_DEVICES=2,3,5 makes only 3 GPU(s) visible" in capsys.readouterr().err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cmd = launch_command(["a=1"], 2)
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd


def test_srun_with_several_tasks_and_no_ranks_is_refused(tmp_path):
    """`srun -n 2 python launch/train.py` (no RANK/WORLD_SIZE) would be two separate trainings
    into one run directory: one sentence saying how to launch instead."""
    import subprocess
    import sys

    from tests.conftest import ROOT, TRAIN_PY, run_env

    env = dict(run_env(1), SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(TRAIN_PY), f"run.root={tmp_path}", *QUICK], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    _one_sentence_error(proc, "started by srun as 2 tasks without RANK/WORLD_SIZE")


def test_a_ctrl_c_while_the_command_exits_is_no_traceback():
    """Ctrl-C to leave `dialtune chat`, pressed twice, lands in Python's shutdown (torch's exit hooks):
    exit 130, nothing on stderr."""
    code = ("import atexit, os, signal, sys; from launch.cli import main; sys.argv = ['dialtune', 'config-doc']; "
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT)); sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr == ""
    # started with SIGINT ignored (a script's background job): it stays ignored
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); from launch.cli import main; "
            "sys.argv = ['dialtune', 'config-doc']; main(); print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert proc.stderr.strip() == "True"
    # and one while the command works (a model loading): one line
    code = ("import os, signal, sys; import launch.cli as cli; "
            "cli.cmd_config_doc = lambda args: os.kill(os.getpid(), signal.SIGINT); "
            "sys.argv = ['dialtune', 'config-doc']; sys.exit(cli.main())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "dialtune config-doc: stopped by Ctrl-C"


def test_the_first_cpu_run_says_that_deepspeed_compiles(tmp_path, monkeypatch, capsys):
    """Its ~30 s of compiling print only compiler lines: one line of ours first; nothing once built."""
    from launch.cli import _first_build_note

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _first_build_note(2)
    assert "DeepSpeed first compiles its CPU communication op" in capsys.readouterr().err
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    _first_build_note(2)
    _first_build_note(1)
    assert capsys.readouterr().err == ""


def test_a_sweep_job_that_fails_on_its_data_is_named(tmp_path):
    """A sweep's jobs are checked before the first starts, but a job's data are read when it runs:
    the job that stops the sweep is named with its swept values in the one sentence."""
    from tests.data_helpers import GOOD, conv, jsonl

    good = jsonl(tmp_path / "good.jsonl", [conv(i, f"question {i}", f"answer {i}") for i in range(24)])
    bad = jsonl(tmp_path / "bad.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD[:2]) + '{"messages": [\n')
    proc = train(["-m", "data=custom", f"data.train_files=[{good}],[{bad}]", "data.eval_fraction=0", "train.max_steps=1",
                  "logger=none", "eval.at_end=[]", "export.merge_at_end=false", "run.name=sw"], tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"dialtune: error: sweep job 1 (data.train_files=[{bad}]): {bad}:3"), errors
    assert (tmp_path / "sw-sweep" / "0" / "summary.json").is_file()
