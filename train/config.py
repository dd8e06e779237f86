"""Typed schema of the Hydra config tree (`conf/`).

The dataclasses are the schema, the YAML files hold values. Every field carries a one-line
`help` (shown by `dialtune config-doc` and in README's configuration reference); a test checks
that none is missing. `validate()` rejects impossible combinations with one sentence each.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "data_pipeline" / "sample_data"
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration a user can fix; the message is one sentence naming the field."""


def doc(default: Any, help: str, **kw):
    """A dataclass field with a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    root: str = doc("outputs", "Directory under which run directories are created.")
    name: str = doc("run", "Run name (conf/train.yaml: <model>-<peft.method>-<quant.mode>); the run directory is <root>/<name> on every rank.")


@dataclass
class TinyModelConfig:
    hidden_size: int = doc(128, "Hidden size of the embedded tiny Llama.")
    intermediate_size: int = doc(352, "MLP width of the embedded tiny Llama.")
    num_hidden_layers: int = doc(4, "Number of decoder layers of the embedded tiny Llama.")
    num_attention_heads: int = doc(4, "Attention heads of the embedded tiny Llama.")
    num_key_value_heads: int = doc(2, "Key/value heads (GQA) of the embedded tiny Llama.")
    max_position_embeddings: int = doc(2048, "Context length of the embedded tiny Llama.")
    seed: int = doc(0, "Seed of the tiny model's random initialisation.")


@dataclass
class ModelConfig:
    name_or_path: str = doc("tiny", "Hub id or local directory of the base model; 'tiny' builds the embedded random Llama.")
    tokenizer: Optional[str] = doc(None, "Tokenizer hub id or directory; default: the model's own (tiny: the embedded one).")
    dtype: str = doc("bf16", "Dtype of the frozen base weights and compute: fp32, bf16 or fp16.")
    attn_implementation: str = doc("sdpa", "transformers attention implementation: sdpa, eager or flash_attention_2.")
    gradient_checkpointing: bool = doc(False, "Recompute activations in the backward pass to save memory.")
    trust_remote_code: bool = doc(False, "Allow model code from the hub repository (only for models you trust).")
    revision: Optional[str] = doc(None, "Hub revision (branch, tag or commit) of the base model.")
    end_of_turn_token: Optional[str] = doc(None, "Token that ends an assistant turn; default: detected from the chat template.")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "Shape of the embedded tiny model (used when name_or_path=tiny)."})


@dataclass
class PeftConfig:
    method: str = doc("lora", "Adapter method: lora, dora, rslora, or none (full fine-tuning).")
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) for rslora).")
    dropout: float = doc(0.05, "Dropout on the LoRA input.")
    target_modules: List[str] = doc(["all-linear"], "Modules that get adapters: ['all-linear'] or explicit names like [q_proj, v_proj].")
    bias: str = doc("none", "Which biases train: none, all or lora_only.")
    modules_to_save: List[str] = doc([], "Extra modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head]).")


@dataclass
class QuantConfig:
    mode: str = doc("none", "Quantization of the frozen base with bitsandbytes: none, int8 or nf4.")
    compute_dtype: str = doc("bf16", "Compute dtype of 4-bit layers: bf16, fp16 or fp32.")
    double_quant: bool = doc(True, "nf4 only: quantize the quantization constants too (saves ~0.4 bit/param).")
    int8_threshold: float = doc(6.0, "int8 only: LLM.int8 outlier threshold.")


@dataclass
class DataConfig:
    train_files: List[str] = doc([], "Chat-JSONL files ({'messages': [{'role','content'}...]}) to train on; .gz accepted.")
    eval_files: List[str] = doc([], "Held-out chat-JSONL files; empty: carve eval_fraction off the training data.")
    eval_fraction: float = doc(0.0, "Share of training conversations held out for eval when eval_files is empty (deterministic).")
    max_seq_len: int = doc(2048, "Longest tokenized conversation; longer ones are truncated on the right.")
    drop_without_targets: bool = doc(True, "Drop conversations that have no assistant token left after truncation (counted).")
    num_proc: int = doc(1, "Processes used for tokenization.")
    seed: int = doc(1234, "Seed of the shuffling and of the eval split.")


@dataclass
class DeepSpeedConfig:
    stage: int = doc(2, "ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters).")
    offload_optimizer: str = doc("none", "Where optimizer states live: none or cpu (ZeRO-Offload).")
    offload_param: str = doc("none", "Where parameters live between uses (ZeRO-3 only): none or cpu.")
    overlap_comm: bool = doc(False, "Overlap gradient reduction with the backward pass.")
    reduce_bucket_size: int = doc(50_000_000, "Elements per gradient-reduction bucket.")
    stage3_param_persistence_threshold: int = doc(100_000, "ZeRO-3: parameters smaller than this stay unpartitioned.")
    timeout_minutes: int = doc(30, "Timeout of collective operations (the prepare-once wait uses its own polling).")
    extra: Dict[str, Any] = doc({}, "Raw DeepSpeed config keys merged last (escape hatch; see DeepSpeed docs).")


@dataclass
class OptimConfig:
    name: str = doc("adamw", "Optimizer: adamw (torch, fused where available).")
    lr: float = doc(2e-4, "Peak learning rate.")
    weight_decay: float = doc(0.0, "Decoupled weight decay.")
    betas: List[float] = doc([0.9, 0.999], "Adam betas.")
    eps: float = doc(1e-8, "Adam epsilon.")
    scheduler: str = doc("cosine", "LR schedule after warmup: cosine, linear or constant.")
    warmup_steps: int = doc(0, "Linear warmup steps; 0 uses warmup_ratio.")
    warmup_ratio: float = doc(0.03, "Warmup as a share of the total optimizer steps (when warmup_steps is 0).")
    min_lr_ratio: float = doc(0.1, "Final LR as a share of the peak (cosine and linear).")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")


@dataclass
class TrainConfig:
    micro_batch_size: int = doc(4, "Conversations per rank per forward pass.")
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = doc(-1, "Optimizer steps to run; -1 runs `epochs` full passes.")
    epochs: int = doc(1, "Passes over the training data when max_steps is -1.")
    eval_every: int = doc(0, "Run held-out eval every N optimizer steps (and at the end); 0: only at the end.")
    eval_max_batches: int = doc(0, "Cap on eval micro-batches per rank; 0: the whole eval set.")
    save_every: int = doc(0, "Save a checkpoint every N optimizer steps (and at the end); 0: only at the end.")
    log_every: int = doc(1, "Write metrics every N optimizer steps.")
    seed: int = doc(42, "Seed of model init (adapters), dropout and data order.")
    resume: str = doc("none", "none, auto (latest checkpoint of this run directory) or a checkpoint directory.")
    progress_bar: bool = doc(True, "Show a progress bar on rank 0.")


@dataclass
class LoggerConfig:
    backend: str = doc("wandb", "Metrics backend besides the always-written metrics.jsonl: wandb or none.")
    project: str = doc("dialtune", "W&B project.")
    entity: Optional[str] = doc(None, "W&B entity (team or user); default: your W&B default.")
    mode: str = doc("auto", "W&B mode: auto (online when WANDB_API_KEY is set, else offline), online or offline.")
    tags: List[str] = doc([], "W&B run tags.")


@dataclass
class ExportConfig:
    merge_at_end: bool = doc(True, "Write a merged checkpoint (<run_dir>/merged) when training ends.")
    dtype: str = doc("auto", "Dtype of the merged weights: auto (the base's training dtype, fp32 for quantized bases: bf16), fp32, bf16 or fp16.")
    max_shard_size: str = doc("2GB", "Largest safetensors shard of the merged checkpoint.")
    verify_tolerance: float = doc(1e-4, "Largest |logit difference| (fp32) allowed between merged and base+adapter; above fails the export.")


@dataclass
class DialtuneConfig:
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run directory."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={"help": "Adapter."})
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"help": "Quantization of the base."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and eval data."})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"help": "DeepSpeed ZeRO."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and LR schedule."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training loop."})
    logger: LoggerConfig = field(default_factory=LoggerConfig, metadata={"help": "Metrics logging."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "Merged checkpoint."})


def _sample(name: str) -> str:
    return str(SAMPLE_DATA / name)


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(str(path))) or "model"


def register() -> None:
    """Register the schema with Hydra's ConfigStore and the resolvers the YAML uses."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", _sample)
        OmegaConf.register_new_resolver("basename", _basename)
    ConfigStore.instance().store(name="dialtune_schema", node=DialtuneConfig)


def iter_docs(cls=DialtuneConfig, prefix=""):
    """Yield (dotted key, type, default, help) for every field, depth first."""
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        sub = f.default_factory() if f.default_factory is not MISSING else None
        if is_dataclass(sub):
            yield from iter_docs(type(sub), key + ".")
            continue
        default = f.default if sub is None else sub
        tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        yield key, tname, default, f.metadata.get("help", "")


# ---------------------------------------------------------------------------------------------
# Validation: impossible combinations, one sentence each.

_CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "peft.method": ("lora", "dora", "rslora", "none"),
    "peft.bias": ("none", "all", "lora_only"),
    "quant.mode": ("none", "int8", "nf4"),
    "quant.compute_dtype": ("fp32", "bf16", "fp16"),
    "deepspeed.stage": (0, 1, 2, 3),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "deepspeed.offload_param": ("none", "cpu"),
    "optim.name": ("adamw",),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "logger.backend": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline"),
    "export.dtype": ("auto", "fp32", "bf16", "fp16"),
}


def validate(cfg, cuda_available: Optional[bool] = None) -> None:
    """Raise ConfigError (one sentence) for a config that cannot run."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()

    q, p, ds, t = cfg.quant.mode, cfg.peft.method, cfg.deepspeed, cfg.train
    if q != "none" and p == "none":
        raise ConfigError(f"quant={q} freezes a quantized base, so it needs an adapter: set peft=lora (or dora/rslora), or quant=none for full fine-tuning.")
    if q == "int8" and ds.stage == 3:
        raise ConfigError("quant=int8 cannot be sharded by ZeRO-3 (bitsandbytes int8 weights are not partitionable): use deepspeed=zero2, or quant=nf4 with ZeRO-3.")
    if q == "nf4" and cfg.quant.compute_dtype == "fp32" and cuda_available:
        raise ConfigError("quant=nf4 needs a 16-bit compute dtype on GPU: set quant.compute_dtype=bf16 (or fp16).")
    if cfg.model.dtype == "fp16" and not cuda_available:
        raise ConfigError("model.dtype=fp16 needs a GPU; on CPU use model.dtype=bf16 or fp32.")
    if ds.offload_param != "none" and ds.stage != 3:
        raise ConfigError(f"deepspeed.offload_param={ds.offload_param} only exists in ZeRO-3: set deepspeed.stage=3 (or deepspeed=zero3_offload).")
    if ds.offload_optimizer != "none" and ds.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage 1-3: set deepspeed.stage=2.")
    if p != "none" and cfg.peft.r < 1:
        raise ConfigError(f"peft.r={cfg.peft.r} must be at least 1.")
    if t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.micro_batch_size and train.grad_accum must both be at least 1.")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs < 1):
        raise ConfigError("nothing to train: set train.max_steps to a positive number or train.epochs >= 1.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive.")
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too short to hold a conversation; use at least 16.")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1).")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: pass data.train_files=[path/to/train.jsonl].")
    for key in ("train_files", "eval_files"):
        for i, path in enumerate(cfg.data[key]):
            if not os.path.isfile(path):
                raise ConfigError(f"data.{key}[{i}]: file {path!r} does not exist; check the path (relative paths are taken from {os.getcwd()}).")
    if t.resume not in ("none", "auto") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume={t.resume!r} is neither none, auto nor an existing checkpoint directory.")
