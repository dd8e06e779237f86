"""Every recipe and config group composes; validation rejects impossible combinations."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipeline.records import SAMPLE_DATA
from train.config import CONF_DIR, ConfigError, iter_docs, register
from train.validate import validate

register()
OWN = Path(__file__).resolve().parent.parent / "pyproject.toml"  # an existing file that is not the bundled sample
GROUPS = ["model", "peft", "quant", "data", "deepspeed", "optim", "logger", "recipe"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":
        overrides.append("model.name_or_path=some/model")
    cfg = _compose(overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.run.name


def test_recipes_set_what_they_promise():
    assert _compose(["recipe=lora_int8"]).quant.mode == "int8"
    # the GPU LoRA recipes fill the GPU's free memory with kept activations (a number or 0 overrides it)
    assert all(_compose([f"recipe={r}"]).kernels.memory_budget_gib == "auto" for r in ("lora_int8", "qlora_nf4", "lora_bf16"))
    assert _compose(["recipe=lora_int8", "kernels.memory_budget_gib=20"]).kernels.memory_budget_gib == 20
    assert _compose(["recipe=qlora_nf4"]).quant.mode == "nf4"
    cfg = _compose(["recipe=lora_bf16"])
    assert (cfg.quant.mode, cfg.model.dtype, cfg.peft.method) == ("none", "bf16", "lora")
    cfg = _compose(["recipe=full_zero3_offload"])
    assert (cfg.peft.method, cfg.deepspeed.stage, cfg.deepspeed.offload_param, cfg.deepspeed.offload_optimizer, cfg.optim.name) == (
        "none", 3, "cpu", "cpu", "cpu_adam")
    validate(cfg, cuda_available=True)
    # a command-line group choice beats the recipe's default
    assert _compose(["recipe=lora_int8", "deepspeed=zero1"]).deepspeed.stage == 1


def test_run_dir_is_deterministic():
    a, b = _compose(), _compose()
    assert a.run.name == b.run.name == "tiny-lora-none"
    assert "now" not in (CONF_DIR / "train.yaml").read_text().split("hydra:")[1]


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="nope"):
        _compose(["train.nope=1"])


@pytest.mark.parametrize("overrides,fragment", [
    (["quant=int8", "deepspeed=zero3"], "ZeRO-3"),
    (["quant=nf4", "peft=none"], "needs an adapter"),
    (["quant=int8", "peft=dora"], "int8 backward"),
    (["deepspeed=zero2_offload"], "optim=cpu_adam"),
    (["train.nonfinite=ignore"], "train.nonfinite"),
    (["data.truncation=middle"], "data.truncation"),
    (["deepspeed=zero2", "deepspeed.offload_param=cpu"], "ZeRO-3"),
    (["data.train_files=[/nonexistent/x.jsonl]"], "does not exist"),
    (["train.max_steps=0"], "nothing to train"),
    (["peft.method=lorax"], "peft.method"),
    (["train.micro_batch_size=0"], "at least 1"),
    (["kernels.memory_budget_gib=-1"], "kernels.memory_budget_gib=-1 is not a GiB count >= 0"),
    (["kernels.memory_budget_gib=24", "kernels.checkpoint_every=2"], "set one of them"),
    (["kernels.memory_budget_gib=auto", "kernels.checkpoint_every=2"], "set one of them"),
    (["kernels.memory_budget_gib=lots"], "kernels.memory_budget_gib='lots' is neither a number of GiB nor auto"),
    (["export.hub_repo_id='acme/support bot'"], "export.hub_repo_id"),
    (["export.hub_repo_id=a/b/c"], r"'namespace/repo_name': 'a/b/c'.$"),  # (not HF's trailing "Use `repo_type` argument")
    (["export.checkpoint=best", "eval.every_n_steps=3", "train.save_every=10"],
     r"export.checkpoint=best picks .* set eval.every_n_steps dividing train.save_every \(now 3 and 10\).$"),
    (["export.checkpoint=best", "train.save_every=0"], r"export.checkpoint=best .* set train.save_every > 0 \(now 0\).$"),
    (["export.checkpoint=best", "eval.every_n_steps=2", "train.save_every=4", "eval.during_training=[intent]"],
     r"set lm in eval.during_training \(now \['intent'\]\).$"),
    (["export.checkpoint=first"], "export.checkpoint='first' is not one of last, best"),
    (["eval.early_stopping_patience=3"],
     r"eval.early_stopping_patience counts .* set eval.every_n_steps > 0 \(now 0\) with lm in eval.during_training"),
    (["eval.early_stopping_patience=3", "eval.every_n_steps=5", "eval.during_training=[response]"],
     r"eval.early_stopping_patience .* \(now \['response'\]\).$"),
    (["eval.early_stopping_min_delta=-0.1"], r"^eval.early_stopping_min_delta=-0.1 must be at least 0.$"),
    # the default data=sample left beside the user's sources: the sample would be trained on
    ([f"data.sources=[{{path: {OWN}}}]"], r"^data.train_files\[0\]='\S*sample_data/train.jsonl' is the bundled sample \(data=sample, "
                                            r"the default, lists it\) beside your training data \(data.sources\[0\].path='\S*pyproject.toml'\): "
                                            r"start from data=custom, .* list the sample in data.sources.$"),
    (["data.eval_fraction=0.1"], r"data.eval_fraction=0.1 holds out .* but data.eval_files\[0\]='\S*/eval.jsonl' is one \(data=sample, "
                                 r"the default, lists it\): set data.eval_files=\[\] to carve the held-out set, or set data.eval_fraction=0"),
    (["data=custom", f"data.train_files=[{OWN}]", f"data.sources=[{{path: {OWN}, split: eval}}]", "data.eval_fraction=0.1"],
     r"but data.sources\[0\].path='\S*pyproject.toml' is one: remove that source to carve"),
    # (config probe) each of these was accepted, or named something else, or a traceback
    (["run.name=''"], r"^run.name='' must name one directory under run.root"),
    (["run.name=../elsewhere"], r"^run.name='../elsewhere' must name one directory under run.root \(no '/'"),
    (["data=custom", "data.sources=[{weight: 2}]"], r"^data.sources\[0\] has no path: give each source one"),
    (["data=custom", f"data.sources=[{{path: {OWN}, split: foo}}]"], r"^data.sources\[0\].split='foo' must be train or eval.$"),
    (["data.intent.user_template=nothing"], r"^data.intent.user_template='nothing' lacks \{text\}"),
    (["+deepspeed.extra.gradient_clipping=abc"], r"^deepspeed.extra.gradient_clipping is set by dialtune from optim.grad_clip: set"),
    (["+deepspeed.extra.zero_optimization.stage=3"], r"^deepspeed.extra.zero_optimization.stage is set by dialtune from deepspeed="),
])
def test_validation_rejects(overrides, fragment):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=fragment) as e:
        validate(cfg, cuda_available=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [["model.dtype=fp16"], ["quant=nf4", "quant.compute_dtype=fp16"]])
def test_fp16_without_zero_is_refused_on_a_gpu(overrides):
    """DeepSpeed 0.19.8's FP16_UnfusedOptimizer (fp16, ZeRO-0) divides the gradients by a loss scale
    (2^16) the engine never applied to the loss: measured on CPU (fp16 let through), the step-2 loss
    was 8.2868 against ZeRO-2's 8.2801. Refused at start; ZeRO-2 in fp16 passes."""
    with pytest.raises(ConfigError, match=r"^fp16 under deepspeed=zero0 would train with updates ~65536x too small .* or bf16.$"):
        validate(_compose(overrides + ["deepspeed=zero0"]), cuda_available=True, files=False)
    validate(_compose(overrides + ["deepspeed=zero2"]), cuda_available=True, files=False)


def test_a_hub_model_offline_must_be_in_the_cache_at_its_revision(monkeypatch, tmp_path):
    """Offline, a hub id is checked against the local cache (the model at model.revision, a separate
    tokenizer repo at its default: the loader pins the model's revision only)."""
    from train.validate import model_dir_problem

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, files in (("acme/model", ["config.json"]), ("acme/tok", ["tokenizer.json"])):  # a tokenizer repo without tokenizer_config.json
        snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        for f in files:
            (snap / f).write_text("{}")
        (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
        (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    assert model_dir_problem("acme/model", "acme/tok") is None
    assert model_dir_problem("acme/model", "acme/tok", revision="abc123") is None  # the tokenizer repo at main
    problem = model_dir_problem("acme/model", None, revision="v2")
    assert "not in the local Hugging Face cache at revision v2" in problem and "`hf download acme/model --revision v2`" in problem
    assert "model.tokenizer='acme/other'" in model_dir_problem("acme/model", "acme/other")


def test_wandb_online_without_a_key_is_refused_at_start(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match=r"^logger.mode=online needs a W&B API key, .* run `wandb login`"):
        validate(_compose(["logger=wandb", "logger.mode=online"]), cuda_available=False)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    validate(_compose(["logger=wandb", "logger.mode=online"]), cuda_available=False)
    validate(_compose(["logger=wandb", "logger.mode=offline"]), cuda_available=False)


def test_customer_service_data_without_its_folder_names_the_variable(monkeypatch, tmp_path):
    from train import config

    monkeypatch.delenv("DIALTUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(config, "DATA_DIR_DEFAULT", str(tmp_path / "shared" / "data"))  # (a clone: no shared/data beside it)
    monkeypatch.chdir(tmp_path)  # (and not there either)
    with pytest.raises(ConfigError, match=r"data=customer_service reads the full public files from \$DIALTUNE_DATA_DIR, which is not set .*FULL_DATA.md names the files"):
        validate(_compose(["data=customer_service"]), cuda_available=False)
    # a relative DIALTUNE_DATA_DIR is taken from here, once: the run's config holds absolute paths
    monkeypatch.setenv("DIALTUNE_DATA_DIR", "cs")
    cfg = _compose(["data=customer_service"])
    assert cfg.data.train_files[0] == str(tmp_path / "cs" / "bitext_customer_support.jsonl.gz")
    with pytest.raises(ConfigError, match=r"DIALTUNE_DATA_DIR=cs holds no bitext_customer_support.jsonl.gz; set it to the folder"):
        validate(cfg, cuda_available=False)
    monkeypatch.delenv("DIALTUNE_DATA_DIR")  # not set: the shared/data folder beside the project's, from any directory
    monkeypatch.setattr(config, "DATA_DIR_DEFAULT", str(config.REPO_ROOT.parent / "shared" / "data"))
    assert _compose(["data=customer_service"]).data.eval_files[0] == str(config.DATA_DIR_DEFAULT + "/validation/sgd_dev.jsonl.gz")


def test_default_config_is_valid():
    validate(_compose(), cuda_available=False)
    validate(_compose(["recipe=demo"]), cuda_available=False)
    # your data alone: data=custom, or the sample's files replaced
    validate(_compose(["data=custom", f"data.sources=[{{path: {OWN}}}]", "data.eval_fraction=0.1"]), cuda_available=False)
    validate(_compose([f"data.train_files=[{OWN}]", "data.eval_files=[]", "data.eval_fraction=0.1"]), cuda_available=False)
    with pytest.raises(ConfigError, match="no training data"):
        validate(_compose(["data=custom"]), cuda_available=False)
    # the sample beside your data on purpose: listed in data.sources
    validate(_compose(["data=custom", f"data.train_files=[{OWN}]", f"data.sources=[{{path: {SAMPLE_DATA / 'train.jsonl'}}}]"]),
             cuda_available=False)


def test_every_field_is_documented():
    missing = [key for key, _, _, help_ in iter_docs() if not help_.strip()]
    assert not missing, f"fields without help: {missing}"


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for key, _, _, help_ in iter_docs():
        assert f"`{key}`" in readme, f"README's configuration reference lacks {key} (regenerate with `dialtune config-doc`)"


def test_config_doc_into_a_pipe_that_closes_early_says_nothing():
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m launch.cli config-doc | true", shell=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.stderr == "", proc.stderr  # (was a BrokenPipeError traceback: `dialtune config-doc | head`)


def test_a_plus_override_with_a_typo_is_refused():
    """`+key=value` makes Hydra add any key, a misspelt one too, which would then do nothing:
    validate() names it and the nearest real key. Free-form dicts (deepspeed.extra) stay open."""
    with pytest.raises(ConfigError, match=r"train\.max_stepz is not a config key \(did you mean train\.max_steps\?\)"):
        validate(_compose(["+train.max_stepz=3"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"^foo is not a config key; "):
        validate(_compose(["+foo=1"]), cuda_available=False)
    validate(_compose(["+deepspeed.extra.steps_per_print=1000"]), cuda_available=False)


def test_a_model_directory_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a directory without config.json"):
        validate(_compose([f"model.name_or_path={tmp_path / 'empty'}"]), cuda_available=False)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has a config.json but no weights"):
        validate(_compose([f"model.name_or_path={no_weights}"]), cuda_available=False)
    (no_weights / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        validate(_compose([f"model.name_or_path={no_weights}"]), cuda_available=False)
    with pytest.raises(ConfigError, match="model.tokenizer=.* is a directory without a tokenizer"):
        validate(_compose([f"model.name_or_path={no_weights}", f"model.tokenizer={tmp_path / 'empty'}"]), cuda_available=False)
    (no_weights / "tokenizer.json").write_text("{}")
    validate(_compose([f"model.name_or_path={no_weights}"]), cuda_available=False)


def test_resume_accepts_a_checkpoint_its_latest_file_or_its_run_and_names_anything_else(tmp_path):
    from train.resume import resume_path

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text("")
    (run / "checkpoints" / "latest").write_text("step_0000004\n")
    want = (str(run / "checkpoints"), "step_0000004")
    for given in (step, run / "checkpoints" / "latest", run / "checkpoints", run):
        assert resume_path(str(given)) == want, given
    validate(_compose([f"train.resume={run}"]), cuda_available=False)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(ConfigError, match="is a run directory without a finished checkpoint"):
        validate(_compose([f"train.resume={run}"]), cuda_available=False)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="is neither none, auto, a checkpoint directory"):
        validate(_compose([f"train.resume={tmp_path / 'elsewhere'}"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"nowhere' does not exist.$"):
        validate(_compose([f"train.resume={tmp_path / 'nowhere'}"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"step_0000002' does not exist \(train.keep_checkpoints may have rotated it away; "
                                          r"\S+checkpoints keeps step_0000004\).$"):
        validate(_compose([f"train.resume={run / 'checkpoints' / 'step_0000002'}"]), cuda_available=False)


def test_rows_longer_than_the_models_positions_are_flagged():
    from transformers import GPT2Config, LlamaConfig

    from model.loader import context_problem

    assert context_problem(LlamaConfig(max_position_embeddings=2048), 2048) is None
    assert "lower data.max_seq_len to 2048" in context_problem(LlamaConfig(max_position_embeddings=2048), 8192)
    assert "the model's 4096 positions" in context_problem(LlamaConfig(max_position_embeddings=4096), 8192)  # RoPE: a warning
    with pytest.raises(ConfigError, match=r"data.max_seq_len=4096 is above the 1024 positions of this gpt2 model, whose "
                                          r"learned position table has no entry past them: lower data.max_seq_len to 1024."):
        context_problem(GPT2Config(n_positions=1024), 4096)


def test_counts_below_one_are_refused():
    from launch.cli import main as cli

    with pytest.raises(ConfigError, match=r"train.max_steps=-5: give a positive number of steps, or -1"):
        validate(_compose(["train.max_steps=-5"]), cuda_available=False)
    assert cli(["demo", "--steps", "0"]) == 2 and cli(["demo", "--nproc", "0"]) == 2 and cli(["train", "--nproc", "-1"]) == 2


@pytest.mark.parametrize("override,message", [
    # each of these reached training: deleted every checkpoint, crashed after the last step, trained
    # backwards or nothing, or changed the run without a word (found by probing every key)
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be at least 0 (0 keeps every checkpoint)."),
    ("train.log_every=0", "train.log_every=0 must be at least 1."),
    ("train.save_every=-1", "train.save_every=-1 must be at least 0 (0: only at the end)."),
    ("train.stop_after_steps=-1", "train.stop_after_steps=-1 must be at least 0 (0: run to the end)."),
    ("train.global_batch_size=-8", "train.global_batch_size=-8 must be at least 0"),
    ("optim.min_lr_ratio=-1", "optim.min_lr_ratio=-1.0 must be in [0, 1] (a share of the peak lr)."),
    ("optim.warmup_ratio=5", "optim.warmup_ratio=5.0 must be in [0, 1)."),
    ("optim.warmup_steps=-2", "optim.warmup_steps=-2 must be at least 0"),
    ("optim.eps=-1", "optim.eps=-1.0 must be above 0."),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be at least 0."),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be at least 0 (0: no clipping)."),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1), e.g. [0.9, 0.999]."),
    ("peft.alpha=0", "peft.alpha=0 must be above 0 (the adapter's output is scaled by alpha / r: 0 would train nothing)."),
    ("peft.dropout=1.5", "peft.dropout=1.5 must be in [0, 1)."),
    ("eval.decoding=[greedy,sampled] eval.temperature=0", "eval.decoding has sampled, which needs eval.temperature > 0 (now 0.0)"),
    ("eval.decoding=[sampled] eval.top_p=0", "eval.decoding has sampled, which needs eval.temperature > 0 (now 0.7) and eval.top_p in (0, 1] (now 0.0)"),
    ("eval.samples=-1", "eval.samples=-1 must be at least 0."), ("eval.max_new_tokens=512 data.max_seq_len=512", "eval.max_new_tokens=512 leaves no room for a response prompt in data.max_seq_len=512;"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5 must be in [0, 1)."),  # (with data=sample's eval file: the range first)
    ("export.eval_conversations=-1", "export.eval_conversations=-1 must be at least 0 (0 skips)."),
    ("export.verify_tolerance=-1", "export.verify_tolerance=-1.0 must be at least 0."),
    ("export.max_shard_size=abc", "export.max_shard_size='abc' is not a size like 2GB or 500MB."),
    ("deepspeed.timeout_minutes=0", "deepspeed.timeout_minutes=0 must be at least 1."),
    ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size=0 must be at least 1."),
    ("model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads=3 must divide model.tiny.hidden_size=128"),
    ("model.attn_implementation=flashy", "model.attn_implementation='flashy' is not one of sdpa, eager, flash_attention_2."),
    ("model.attn_implementation=flash_attention_2", "model.attn_implementation=flash_attention_2 needs a GPU and the flash-attn package"),
    ("model=hf", "model=hf needs model.name_or_path=<hub id or model directory>"),
    ("quant=nf4 quant.compute_dtype=fp32", "quant=nf4 needs a 16-bit compute dtype: set quant.compute_dtype=bf16"),
    ("quant=int8 quant.compute_dtype=fp16", "quant.compute_dtype=fp16 needs a GPU; on CPU use quant.compute_dtype=bf16."),
    ("quant=nf4 peft=dora deepspeed=zero3", "peft=dora on quant=nf4 under ZeRO-3 fails in its first backward"),
])
def test_values_out_of_range_are_one_sentence(override, message):
    with pytest.raises(ConfigError) as e:
        validate(_compose(override.split()), cuda_available=False)
    assert str(e.value).startswith(message), str(e.value)


def test_sampling_settings_are_free_when_decoding_is_greedy():
    """eval.temperature / eval.top_p are read by the sampled decoding only: 0 (as `dialtune chat
    --temperature 0` means greedy) is no error under the default greedy decoding."""
    validate(_compose(["eval.temperature=0", "eval.top_p=0"]), cuda_available=False)


def test_an_unusable_directory_is_one_sentence(tmp_path):
    """run.root is checked before Hydra creates the run directory in it (its traceback otherwise),
    data.cache_dir before the data are prepared."""
    from launch.prepare import override_problem

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert override_problem([f"run.root={a_file}"], root=True) == (f"run.root={str(a_file)!r} is a file, not a directory; point "
                                                                  "it at a directory (it is created when missing).")
    assert override_problem(["run.root=/proc/dialtune-test"], root=True).startswith("run.root='/proc/dialtune-test' cannot be used as a directory")
    with pytest.raises(ConfigError, match="data.cache_dir=.* is a file, not a directory"):
        validate(_compose([f"data.cache_dir={a_file}", f"run.root={tmp_path}"]), cuda_available=False)


def test_merge_on_the_wrong_directory_says_which_to_pass(tmp_path, capsys):
    from launch.cli import main as cli

    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "config.yaml").write_text("peft:\n  method: lora\n")
    assert cli(["merge", str(run / "merged")]) == 2
    assert f"it lies inside the run directory {run}: pass that" in capsys.readouterr().err
    assert cli(["merge", str(run / "checkpoints" / "step_0000002")]) == 2
    assert f"dialtune merge {run} --checkpoint step_0000002" in capsys.readouterr().err
    assert cli(["merge", str(run)]) == 2  # no checkpoint has an adapter yet
    assert "train longer" in capsys.readouterr().err


def test_resuming_under_other_adapter_settings_is_named(tmp_path):
    from train.resume import resume_mismatch

    cfg = _compose(["peft.r=16"])
    step = tmp_path / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert resume_mismatch(str(tmp_path / "checkpoints"), "step_0000004", cfg) is None
    assert resume_mismatch(str(tmp_path / "checkpoints"), "step_0000004", _compose(["peft.r=16", "optim.lr=1e-3"])) is None
    said = resume_mismatch(str(tmp_path / "checkpoints"), "step_0000004", _compose(["peft.r=8"]))
    assert said.startswith(f"checkpoint {step} was trained with peft.r=16, this run has peft.r=8: resume with")
    assert "target_modules" in resume_mismatch(str(tmp_path / "checkpoints"), "step_0000004",
                                               _compose(["peft.target_modules=[q_proj]"]))


def test_resuming_with_other_hyperparameters_is_warned(tmp_path):
    """resume=auto into a run written with other settings (a resubmission with another lr) is not
    silent; routine differences (train.resume, logger, progress bar) are not flagged."""
    from train.resume import resume_changes

    root, tag = str(tmp_path / "checkpoints"), "step_0000004"
    (tmp_path / "checkpoints" / tag).mkdir(parents=True)
    (tmp_path / "checkpoints" / tag / "config.yaml").write_text(OmegaConf.to_yaml(_compose(["optim.lr=1e-4"]), resolve=True))
    assert resume_changes(root, tag, _compose(["optim.lr=1e-4", "train.resume=auto", "logger=none", "train.progress_bar=false"])) is None
    # a checkpoint from a dialtune without kernels.memory_budget_gib: the new key at its default is no change
    older = OmegaConf.to_container(_compose(["optim.lr=1e-4"]), resolve=True)
    del older["kernels"]["memory_budget_gib"]
    (tmp_path / "checkpoints" / tag / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert resume_changes(root, tag, _compose(["optim.lr=1e-4"])) is None
    assert "kernels.memory_budget_gib None -> 20" in resume_changes(root, tag, _compose(["optim.lr=1e-4",
                                                                                        "kernels.memory_budget_gib=20"]))
    said = resume_changes(root, tag, _compose(["optim.lr=5e-3", "train.resume=auto", "data.seed=3"]))
    assert said.startswith(f"resuming {root}/{tag} with settings that differ from the checkpoint's: data.seed 1234 -> 3, optim.lr 0.0001 -> 0.005;"), said
    assert "schedule" not in said
    # a longer run: the schedule changes shape (cosine: the lr climbs back from the old floor); constant: nothing to say
    said = resume_changes(root, tag, _compose(["optim.lr=1e-4", "train.max_steps=10"]))
    assert "(the cosine lr schedule is rebuilt for the new length" in said, said
    assert "is rebuilt" not in resume_changes(root, tag, _compose(["optim.lr=1e-4", "train.max_steps=10", "optim.scheduler=constant"]))
