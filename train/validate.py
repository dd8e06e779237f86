"""Validation of a composed config (train/config.py's schema): impossible combinations, missing
files, unknown keys, each refused with one sentence (ConfigError) before anything starts."""
from __future__ import annotations

import difflib
import os
from typing import Optional, Tuple

from omegaconf import OmegaConf

from data_pipeline.records import expand_pattern, is_bundled_sample
from data_pipeline.validate import is_blank
from model.memory import budget_problem

from . import config
from .config import CONF_DIR, ConfigError, DialtuneConfig, iter_docs
from .bounds import bounds_problem
from .ds_config import extra_problem, mixed_precision
from .metrics import wandb_api_key_found

_CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "peft.method": ("lora", "dora", "rslora", "none"),
    "peft.bias": ("none", "all", "lora_only"),
    "quant.mode": ("none", "int8", "nf4"),
    "quant.compute_dtype": ("fp32", "bf16", "fp16"),
    "deepspeed.stage": (0, 1, 2, 3),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "deepspeed.offload_param": ("none", "cpu"),
    "optim.name": ("adamw", "adamw_8bit", "paged_adamw_8bit", "cpu_adam"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "train.nonfinite": ("skip", "stop"),
    "logger.backend": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline"),
    "export.dtype": ("auto", "fp32", "bf16", "fp16"),
    "kernels.packed_attention": ("auto", "varlen", "mask"),
    "export.base": ("original", "dequantized"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "intent"),
    "data.truncation": ("keep_recent", "right", "drop"),
    "data.labels": ("all_assistant", "last_turn"),
    "data.chat_template": (None, "chatml", "llama-3", "qwen2", "mistral"),
    "data.on_error": ("strict", "lenient"),
    "data.utf16": ("reject", "convert"),
    "data.trailing_user": ("trim", "reject"),
    "data.same_role": ("merge", "reject"),
    "data.long_message": ("truncate", "drop"),
    "data.duplicate_ids": ("reject", "keep"),
}


_ATTENTION = ("sdpa", "eager", "flash_attention_2")

def unknown_key_problem(cfg) -> Optional[str]:
    """A key the schema does not have (Hydra's `+key=value` adds any key, a typo too), as one
    sentence with the nearest real key (or config group); None when every key is known."""
    from omegaconf.errors import ConfigKeyError

    try:
        # as plain data: merged as a typed node, an added key would ride along unchecked
        OmegaConf.merge(OmegaConf.structured(DialtuneConfig), OmegaConf.to_container(cfg))
    except ConfigKeyError as e:
        key = str(getattr(e, "full_key", "") or "?")
        groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
        if "." not in key and (group := difflib.get_close_matches(key, groups, n=1, cutoff=0.6)):  # optimizer=adamw
            choices = sorted(p.stem for p in (CONF_DIR / group[0]).glob("*.yaml"))
            return f"{key} is not a config key (did you mean the config group {group[0]}=<{'|'.join(choices)}>?)."
        near = difflib.get_close_matches(key, [k for k, *_ in iter_docs()], n=1, cutoff=0.6)
        return (f"{key} is not a config key" + (f" (did you mean {near[0]}?)" if near else "")
                + "; `dialtune config-doc` lists them all.")
    return None


def model_dir_problem(path: str, tok: Optional[str] = None, what: str = "model.name_or_path",
                      revision: Optional[str] = None) -> Optional[str]:
    """What a local model directory (and model.tokenizer's) lacks, or a source that is neither a
    directory nor a usable hub id (hub_id_problem), as one sentence; None for a complete one."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{what}={path!r} is a directory without config.json; point it at a saved model (config.json, weights, tokenizer) or a hub id."
        if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
            return f"{what}={path!r} has a config.json but no weights ({', '.join(weights[::2])}); point it at a saved model."
        if tok is None and not any(os.path.isfile(os.path.join(path, t)) for t in tokenizer_files):
            return f"{what}={path!r} has no tokenizer (tokenizer.json / tokenizer_config.json); set model.tokenizer=<its directory or hub id>."
    if tok and os.path.isdir(tok) and not any(os.path.isfile(os.path.join(tok, t)) for t in tokenizer_files):
        return f"model.tokenizer={tok!r} is a directory without a tokenizer (tokenizer.json / tokenizer_config.json)."
    for key, value, rev in ((what, path, revision), ("model.tokenizer", tok, None)):  # the loader pins the model's revision only
        if value and value != "tiny" and not os.path.isdir(value) and (problem := hub_id_problem(key, value, rev)):
            return problem
    return None


def hub_id_problem(key: str, value: str, revision: Optional[str] = None) -> Optional[str]:
    """A model/tokenizer source that is no directory: one sentence when it is no hub id either (a
    mistyped path), or when the hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and the id is
    not in the local cache; None otherwise (online, the hub answers at load time)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return (f"{key}={value!r} is not a directory (relative paths are taken from {os.getcwd()}) nor a hub id "
                "(namespace/name); check the path.")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    files = ("config.json",) if key != "model.tokenizer" else ("tokenizer_config.json", "tokenizer.json", "config.json")
    cached = any(isinstance(try_to_load_from_cache(value, f, revision=revision or None), str) for f in files)
    if key == "model.name_or_path" and "/" not in value and not cached and (
            near := difflib.get_close_matches(value, [p.stem for p in (CONF_DIR / "model").glob("*.yaml")], 1, 0.75)):
        # a mistyped config name: say so now, not after a minute of the hub's retries for an id without a namespace
        return (f"model={value} is no config in conf/model (did you mean model={near[0]}?), no directory and no cached model; "
                "a hub id has the form namespace/name, e.g. meta-llama/Meta-Llama-3-8B.")
    if offline and not cached:
        pinned = f" --revision {revision}" if revision else ""
        return (f"{key}={value!r} is no local directory (relative paths are taken from {os.getcwd()}), and as a hub id it is "
                f"not in the local Hugging Face cache{' at revision ' + revision if revision else ''}, which HF_HUB_OFFLINE=1 "
                f"keeps it from downloading: download it first (`hf download {value}{pinned}`) or point {key} at a saved "
                "model directory.")
    return None


def validate(cfg, cuda_available: Optional[bool] = None, files: bool = True) -> None:
    """Raise ConfigError (one sentence) for a config that cannot run. files=False (`dialtune slurm`
    on a login node, whose paths may differ from the nodes'): no check of files, directories or the
    hub cache."""
    name = str(cfg.run.name)
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"run.name={name!r} must name one directory under run.root (no '/', not empty or '..'): the run "
                          "directory is <run.root>/<run.name>.")
    if not cfg.model.name_or_path:
        raise ConfigError("model=hf needs model.name_or_path=<hub id or model directory> (or pass model=<hub id or directory>, "
                          "which sets both).")
    problem = unknown_key_problem(cfg) or (files and model_dir_problem(cfg.model.name_or_path, cfg.model.tokenizer,
                                                                       revision=cfg.model.revision))
    if problem:
        raise ConfigError(problem)
    for key, allowed in _CHOICES.items():
        if key.startswith(("data.", "eval.")):
            continue  # validate_data() and validate_eval() below check these
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    if problem := bounds_problem(cfg, skip=("data.", "eval.")) or extra_problem(cfg.deepspeed):  # (validate_data/_eval: data., eval.)
        raise ConfigError(problem)
    if cfg.model.attn_implementation not in _ATTENTION:
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation!r} is not one of {', '.join(_ATTENTION)}.")
    tiny = cfg.model.tiny
    if cfg.model.name_or_path == "tiny" and (tiny.hidden_size % tiny.num_attention_heads or tiny.num_attention_heads % tiny.num_key_value_heads):
        raise ConfigError(f"model.tiny.num_attention_heads={tiny.num_attention_heads} must divide model.tiny.hidden_size="
                          f"{tiny.hidden_size}, and model.tiny.num_key_value_heads={tiny.num_key_value_heads} must divide it in turn.")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()

    q, p, ds, t = cfg.quant.mode, cfg.peft.method, cfg.deepspeed, cfg.train
    if q != "none" and p == "none":
        raise ConfigError(f"quant={q} freezes a quantized base, so it needs an adapter: set peft=lora (or dora/rslora), or quant=none for full fine-tuning.")
    if q == "int8" and p == "dora":
        raise ConfigError("peft=dora on quant=int8 fails in bitsandbytes' int8 backward; use peft=lora with int8, or quant=nf4 with DoRA.")
    if q == "nf4" and p == "dora" and ds.stage == 3:
        raise ConfigError("peft=dora on quant=nf4 under ZeRO-3 fails in its first backward (DeepSpeed's ZeRO-3 hooks fetch the "
                          "4-bit weight DoRA reads as if it were a partitioned parameter): use deepspeed=zero2, or peft=lora with ZeRO-3.")
    if q == "int8" and ds.stage == 3:
        raise ConfigError("quant=int8 cannot be sharded by ZeRO-3 (bitsandbytes int8 weights are not partitionable): use deepspeed=zero2, or quant=nf4 with ZeRO-3.")
    if q == "nf4" and cfg.quant.compute_dtype == "fp32":  # (on CPU bitsandbytes' 4-bit fp32 matmul fails on a shape)
        raise ConfigError("quant=nf4 needs a 16-bit compute dtype: set quant.compute_dtype=bf16 (or fp16 on a GPU).")
    if mixed_precision(cfg) == "fp16" and not cuda_available:
        key = "model.dtype" if q == "none" else "quant.compute_dtype"
        raise ConfigError(f"{key}=fp16 needs a GPU; on CPU use {key}=bf16" + (" or fp32." if q == "none" else "."))
    if cfg.model.attn_implementation == "flash_attention_2" and files and not (cuda_available and _has_flash_attn()):
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a GPU and the flash-attn package (pip install "
                          "flash-attn); sdpa (the default) needs neither.")
    if ds.stage == 0 and mixed_precision(cfg) == "fp16":
        raise ConfigError("fp16 under deepspeed=zero0 would train with updates ~65536x too small (DeepSpeed 0.19 unscales gradients "
                          "whose loss it did not scale there): use deepspeed=zero1 or zero2 (for LoRA on one GPU the same memory), or bf16.")
    if ds.offload_param != "none" and ds.stage != 3:
        raise ConfigError(f"deepspeed.offload_param={ds.offload_param} only exists in ZeRO-3: set deepspeed.stage=3 (or deepspeed=zero3_offload).")
    if ds.offload_optimizer != "none" and ds.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage 1-3: set deepspeed.stage=2.")
    if ds.offload_optimizer != "none" and cfg.optim.name != "cpu_adam":
        raise ConfigError(f"deepspeed.offload_optimizer={ds.offload_optimizer} steps the optimizer on the CPU, which optim={cfg.optim.name} cannot do: add optim=cpu_adam.")
    if cfg.optim.name == "cpu_adam" and ds.offload_optimizer == "none" and cuda_available:
        raise ConfigError("optim=cpu_adam keeps optimizer states on the CPU: use it with deepspeed.offload_optimizer=cpu (deepspeed=zero2_offload or zero3_offload).")
    if t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps}: give a positive number of steps, or -1 for train.epochs full passes.")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs < 1):
        raise ConfigError("nothing to train: set train.max_steps to a positive number or train.epochs >= 1.")
    validate_data(cfg.data, files=files)
    for key in ("run.root", "data.cache_dir"):
        if files and (path := OmegaConf.select(cfg, key)) and (problem := directory_problem(key, path)):
            raise ConfigError(problem)
    validate_eval(cfg.eval, files=files, max_seq_len=cfg.data.max_seq_len)
    if problem := budget_problem(cfg.kernels.memory_budget_gib, cfg.kernels.checkpoint_every):
        raise ConfigError(problem)
    if files and t.resume not in ("none", "auto"):
        from train.resume import resume_path

        try:
            resume_path(t.resume)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.logger.backend == "wandb" and cfg.logger.mode == "online" and not wandb_api_key_found():
        raise ConfigError("logger.mode=online needs a W&B API key, and neither WANDB_API_KEY nor ~/.netrc has one: run "
                          "`wandb login`, set WANDB_API_KEY, or use logger.mode=offline (sync later) or logger=none.")
    from model.stream_merge import MergeError, parse_size

    try:
        parse_size(cfg.export.max_shard_size)
    except MergeError as e:
        raise ConfigError(str(e)) from None
    if cfg.export.checkpoint not in ("last", "best"):
        raise ConfigError(f"export.checkpoint={cfg.export.checkpoint!r} is not one of last, best.")
    ev = cfg.eval
    if cfg.export.checkpoint == "best":
        needs = ("train.save_every > 0 (now 0)" if t.save_every <= 0 else
                 f"eval.every_n_steps dividing train.save_every (now {ev.every_n_steps} and {t.save_every})"
                 if ev.every_n_steps <= 0 or t.save_every % ev.every_n_steps else
                 f"lm in eval.during_training (now {list(ev.during_training)})" if "lm" not in ev.during_training else None)
        if needs:
            raise ConfigError("export.checkpoint=best picks the checkpoint with the lowest held-out loss, so each needs one "
                              f"measured at its step: set {needs}.")
    if ev.early_stopping_patience and (ev.every_n_steps <= 0 or "lm" not in ev.during_training):
        raise ConfigError("eval.early_stopping_patience counts in-training evaluations of the held-out loss: set eval.every_n_steps "
                          f"> 0 (now {ev.every_n_steps}) with lm in eval.during_training (now {list(ev.during_training)}).")
    if cfg.export.hub_repo_id:
        from model.card import repo_id_problem

        problem = repo_id_problem(cfg.export.hub_repo_id)
        if problem:
            raise ConfigError(f"export.hub_repo_id={cfg.export.hub_repo_id!r}: {problem}.")


def validate_eval(e, files: bool = True, max_seq_len: int = 0, parts=None) -> None:
    """The eval section; with max_seq_len, whether a response evaluation (in `parts`, default
    those of eval.during_training and eval.at_end) leaves its prompts room (before training, not
    when the end-of-training evaluation first builds them)."""
    for key in ("during_training", "at_end"):
        bad = [p for p in e[key] if p not in ("lm", "intent", "response")]
        if bad:
            raise ConfigError(f"eval.{key} has {bad[0]!r}; parts are lm, intent and response.")
    bad = [m for m in e.intent_modes if m not in ("loglik", "generate")]
    if bad:
        raise ConfigError(f"eval.intent_modes has {bad[0]!r}; modes are loglik and generate.")
    bad = [d for d in e.decoding if d not in ("greedy", "sampled")]
    if bad:
        raise ConfigError(f"eval.decoding has {bad[0]!r}; decodings are greedy and sampled.")
    for i, path in enumerate(e.intent_files):
        if files and not os.path.exists(path):
            raise ConfigError(f"eval.intent_files[{i}]: file {path!r} does not exist; check the path.")
    if problem := bounds_problem(e, "eval."):
        raise ConfigError(problem)
    if "sampled" in e.decoding and not (e.temperature > 0 and 0 < e.top_p <= 1):  # (read by the sampled decoding only)
        raise ConfigError(f"eval.decoding has sampled, which needs eval.temperature > 0 (now {e.temperature}) and eval.top_p in "
                          f"(0, 1] (now {e.top_p}); for greedy decoding only, set eval.decoding=[greedy].")
    parts = [*e.during_training, *e.at_end] if parts is None else parts
    if max_seq_len and "response" in parts and e.response_conversations and e.max_new_tokens >= max_seq_len:
        raise ConfigError(f"eval.max_new_tokens={e.max_new_tokens} leaves no room for a response prompt in data.max_seq_len="
                          f"{max_seq_len}; lower eval.max_new_tokens or raise data.max_seq_len (or leave response out of the eval parts).")


def validate_data(d, training: bool = True, files: bool = True) -> None:
    """The data section alone (also what `dialtune prepare` checks; `dialtune eval`, which reads
    only the held-out side, passes training=False: no data_mix_problem)."""
    for key, allowed in _CHOICES.items():
        if key.startswith("data."):
            value = OmegaConf.select(d, key[5:])
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    for i, s in enumerate(d.sources):
        if OmegaConf.is_missing(s, "path") or not str(s.path).strip():
            raise ConfigError(f"data.sources[{i}] has no path: give each source one, e.g. {{path: data/train.jsonl, weight: 1}}.")
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight={s.weight} must be positive (remove the source to leave it out).")
        if s.format not in _CHOICES["data.format"]:
            raise ConfigError(f"data.sources[{i}].format={s.format!r} is not one of {', '.join(_CHOICES['data.format'])}.")
        if s.split not in ("train", "eval"):
            raise ConfigError(f"data.sources[{i}].split={s.split!r} must be train or eval.")
        if s.split == "eval" and s.weight != 1:
            raise ConfigError(f"data.sources[{i}].weight={s.weight}: weights mix the training data only; a split: eval source "
                              "is read once, whole (to evaluate on less, give a smaller file).")
        if s.system_prompt and is_blank(s.system_prompt):  # (every conversation of the source would be refused for it)
            raise ConfigError(f"data.sources[{i}].system_prompt={s.system_prompt!r} is blank (whitespace or invisible characters "
                              "only), an empty system message that every conversation of that source without one would be refused for; "
                              "give it text, or leave it out (null) for none.")
    if d.intent.system_prompt and is_blank(d.intent.system_prompt):
        raise ConfigError(f"data.intent.system_prompt={d.intent.system_prompt!r} is blank (whitespace or invisible characters "
                          "only), an empty system message that every intent record ({text, label}) would be refused for; give "
                          "it text, or set it to '' for none.")
    if training and not d.train_files and not any(s.split == "train" for s in d.sources):
        raise ConfigError("no training data: pass data.train_files=[path/to/train.jsonl] or data.sources=[{path: ..., weight: 1}].")
    for key, path, _ in _data_paths(d) if files else ():
        if problem := _missing_path_problem(key, path):
            raise ConfigError(problem)
    if files and (problem := repeated_file_problem(d)):
        raise ConfigError(problem)
    if "{text}" not in d.intent.user_template:
        raise ConfigError(f"data.intent.user_template={d.intent.user_template!r} lacks {{text}}, where each utterance goes "
                          "(e.g. 'Customer message: {text}').")
    if (problem := bounds_problem(d, "data.")) or (training and (problem := data_mix_problem(d))):
        raise ConfigError(problem)


def _missing_path_problem(key: str, path: str) -> Optional[str]:
    """One sentence when a data path (a file, a saved dataset or a glob pattern) names nothing."""
    found = expand_pattern(path)
    if found and (found != [path] or os.path.exists(path)):
        return None
    where = f"relative paths are taken from {os.getcwd()}"
    if found != [path]:  # a glob pattern
        return (f"{key}: the pattern {path!r} matches no file; check it ({where}"
                + ("; a [ or ] of a folder's name is written [[] or []]" if "[" in path else "") + ").")
    if path.startswith(config.data_dir() + os.sep):  # data=customer_service
        names = "data_pipeline/sample_data/FULL_DATA.md names the files and their sources"
        if not os.environ.get("DIALTUNE_DATA_DIR"):
            return (f"{key}: file {path!r} does not exist: data=customer_service reads the full public files from "
                    "$DIALTUNE_DATA_DIR, which is not set" + ("" if os.path.isdir(config.DATA_DIR_DEFAULT) else
                                                              f" (nor is there a {config.DATA_DIR_DEFAULT})")
                    + f"; set it to the folder that holds them ({names}).")
        return (f"{key}: file {path!r} does not exist: DIALTUNE_DATA_DIR={os.environ['DIALTUNE_DATA_DIR']} "
                f"holds no {os.path.relpath(path, config.data_dir())}; set it to the folder that holds the full files ({names}).")
    return f"{key}: file {path!r} does not exist; check the path ({where})."


def _data_paths(d):
    """(key, path, split) of every data file, named as the config names it."""
    out = [(f"data.{split}_files[{i}]", p, split) for split in ("train", "eval") for i, p in enumerate(d[f"{split}_files"])]
    return out + [(f"data.sources[{i}].path", s.path, s.split) for i, s in enumerate(d.sources)]


def repeated_file_problem(d) -> Optional[str]:
    """One sentence when two data paths of one split (two entries, or a glob pattern and a path) name
    the same file, which would be read twice (trained on twice) and reported once; else None. (A
    file both trained on and held out is warned about when the data is prepared.)"""
    seen = {}
    for key, path, split in _data_paths(d):
        for f in expand_pattern(path):
            first = seen.setdefault((split, os.path.realpath(f)), (key, path))
            if first[0] != key:
                fix = ("list it once, in one source, and give that source a weight to repeat it (weight: 2 trains on it twice)"
                       if split == "train" else "list it once")
                return (f"{first[0]}={first[1]!r} and {key}={path!r} both name {f}, which would be "
                        + ("trained on" if split == "train" else "evaluated") + f" twice and reported once; {fix}.")
    return None


def data_mix_problem(d) -> Optional[str]:
    """The default data=sample's files left beside the user's own training data (sources add to
    data.train_files), or a data.eval_fraction that held-out files would silently override; one
    sentence, or None. The sample trains beside your data on purpose when listed in data.sources."""
    paths = _data_paths(d)
    own = [(k, p) for k, p, split in paths if split == "train" and not is_bundled_sample(p)]
    sample = [(k, p) for k, p, _ in paths if k.startswith("data.train_files") and is_bundled_sample(p)]
    if sample and own:
        return (f"{sample[0][0]}={sample[0][1]!r} is the bundled sample (data=sample, the default, lists it) beside your "
                f"training data ({own[0][0]}={own[0][1]!r}): start from data=custom, or leave it out of data.train_files; "
                "to train on both on purpose, list the sample in data.sources.")
    held_out = [(k, p) for k, p, split in paths if split == "eval"]
    if d.eval_fraction > 0 and held_out:
        key, path = held_out[0]
        return (f"data.eval_fraction={d.eval_fraction} holds out part of the training data only when no held-out files are "
                f"given, but {key}={path!r} is one" + (" (data=sample, the default, lists it)" if is_bundled_sample(path) else "")
                + ": " + ("set data.eval_files=[]" if key.startswith("data.eval_files") else "remove that source")
                + " to carve the held-out set, or set data.eval_fraction=0 to keep the file.")
    return None


def unusable_directory(path: str) -> Optional[Tuple[str, str]]:
    """Why `path` cannot serve as a directory to write into: ("file", ""), ("create", the OS's
    reason: a read-only or virtual file system, a file on the way) or ("write", ""); None when it
    can. Creates it, as the run would."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return "file", ""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return "create", str(e.strerror)
    return ("write", "") if not os.access(path, os.W_OK | os.X_OK) else None


def directory_problem(key: str, path: str) -> Optional[str]:
    """One sentence when `path` (run.root, data.cache_dir) cannot serve as a directory to write
    into, else None (unusable_directory)."""
    why, detail = unusable_directory(path) or (None, "")
    fix = "point it at a directory you can write to"
    return {"file": f"{key}={path!r} is a file, not a directory; point it at a directory (it is created when missing).",
            "create": f"{key}={path!r} cannot be used as a directory ({detail}); {fix}.",
            "write": f"{key}={path!r} is not writable; {fix}."}.get(why)


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None

