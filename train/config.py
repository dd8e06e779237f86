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
    add_tokens: List[str] = doc([], "Special tokens to add to the tokenizer; embeddings are resized and embed_tokens/lm_head then train in full (saved with the adapter).")
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
class SourceConfig:
    path: str = doc("???", "File (JSONL/JSON/CSV/Parquet, optionally .gz) or saved `datasets` directory.")
    weight: float = doc(1.0, "Sampling weight: 2 repeats every record twice, 0.5 keeps a seeded half.")
    format: str = doc("auto", "Record format: auto (detected per record), messages, sharegpt, alpaca, prompt_completion or intent.")
    system_prompt: Optional[str] = doc(None, "System message put first in every conversation of this source that has none.")
    split: str = doc("train", "train or eval: which set the source feeds.")


@dataclass
class IntentConfig:
    system_prompt: str = doc("Classify the customer's message into its intent. Answer with the intent label only.", "System message of intent-labelled records ({'text','label'}).")
    user_template: str = doc("{text}", "User turn of intent records; {text} is replaced by the utterance.")


@dataclass
class DataConfig:
    train_files: List[str] = doc([], "Training files (same as sources with weight 1); chat JSONL or any format below.")
    eval_files: List[str] = doc([], "Held-out files; empty: carve eval_fraction off the training data.")
    sources: List[SourceConfig] = doc([], "Weighted sources: [{path, weight, format, system_prompt, split}], added to train_files/eval_files.")
    format: str = doc("auto", "Format of every record unless a source sets its own: auto, messages, sharegpt, alpaca, prompt_completion, intent.")
    eval_fraction: float = doc(0.0, "Share of training conversations held out for eval when no eval files are given (deterministic).")
    max_seq_len: int = doc(2048, "Token budget of one conversation (and of one packed row).")
    truncation: str = doc("keep_recent", "Over-long conversations: keep_recent (drop the oldest turns, keep >= 1 assistant target), right (cut the end) or drop.")
    labels: str = doc("all_assistant", "Which turns are targets: all_assistant or last_turn (only the final assistant turn).")
    chat_template: Optional[str] = doc(None, "Named template (chatml, llama-3, qwen2, mistral) for tokenizers without one, or to override theirs.")
    packing: bool = doc(False, "Pack several conversations per row (best-fit-decreasing) with boundary-safe attention.")
    on_error: str = doc("strict", "Bad records: strict (stop with file:line for the first errors) or lenient (skip, count, report).")
    max_errors_shown: int = doc(5, "strict: how many errors to collect before stopping.")
    utf16: str = doc("reject", "UTF-16 files: reject (with a message) or convert.")
    trailing_user: str = doc("trim", "Conversation ending with a user turn: trim it or reject the record.")
    same_role: str = doc("merge", "Consecutive turns of one role: merge them (joined by a newline) or reject the record.")
    long_message: str = doc("truncate", "Message longer than max_message_chars: truncate it or drop the record.")
    max_message_chars: int = doc(100_000, "Longest message in characters (before tokenization).")
    duplicate_ids: str = doc("reject", "Records repeating an earlier 'id': reject (an error/skip) or keep.")
    intent: IntentConfig = field(default_factory=IntentConfig, metadata={"help": "How intent records become conversations."})
    cache_dir: Optional[str] = doc(None, "Tokenized-data cache (shared or node-local); default ~/.cache/dialtune/data.")
    num_proc: int = doc(1, "Processes used for tokenization.")
    fast_tokenization: bool = doc(True, "Tokenize from the chat template read once (tiktoken for byte-level BPE) instead of rendering it per conversation; used only where it gives the same tokens as the template on the first 64 conversations.")
    seed: int = doc(1234, "Seed of shuffling, packing, source sampling and the eval split.")


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
    name: str = doc("adamw", "Optimizer: adamw (torch, fused on GPU), adamw_8bit / paged_adamw_8bit (bitsandbytes), cpu_adam (DeepSpeed, for optimizer offload).")
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
    global_batch_size: int = doc(0, "Conversations (or packed rows) per optimizer step over all ranks; when set, it wins: grad_accum = global / (micro x ranks), which must divide.")
    max_steps: int = doc(-1, "Optimizer steps to run; -1 runs `epochs` full passes.")
    epochs: int = doc(1, "Passes over the training data when max_steps is -1.")
    save_every: int = doc(0, "Save a checkpoint every N optimizer steps (and at the end); 0: only at the end.")
    log_every: int = doc(1, "Write metrics every N optimizer steps.")
    seed: int = doc(42, "Seed of model init (adapters), dropout and data order.")
    resume: str = doc("none", "none, auto (latest checkpoint of this run directory), a checkpoint directory (checkpoints/step_N), or another run's directory, checkpoints/ or latest file (its latest checkpoint).")
    stop_after_steps: int = doc(0, "Stop this job (with a checkpoint) after N optimizer steps; resume later with train.resume=auto. 0: run to the end.")
    progress_bar: bool = doc(True, "Show a progress bar on rank 0.")
    nonfinite: str = doc("skip", "Non-finite loss (agreed over all ranks): skip the update (counted, logged; the bad micro-batches give zero gradients and the step runs at lr 0, so no weight changes) or stop (save the last good state, exit 3).")
    max_nonfinite_in_row: int = doc(3, "skip: stop like `stop` after more than this many non-finite steps in a row.")
    keep_checkpoints: int = doc(3, "Keep the newest N complete checkpoints (0: keep all).")


@dataclass
class KernelsConfig:
    fused_ce: bool = doc(True, "Chunked linear + cross-entropy over target positions only: the [tokens, vocab] logits never materialise (same loss); falls back to full logits under ZeRO-3, for models that transform their logits, and with an adapter on lm_head.")
    ce_chunk_size: int = doc(1024, "Target rows per chunk of the fused cross-entropy (~1.3 GB of fp32 temporaries per 1024 rows at a 128k vocabulary).")
    fast_int8: bool = doc(True, "quant=int8: dequantise the int8 weights per layer into 16-bit GEMMs instead of LLM.int8's int8 matmul with outlier decomposition (same int8 weight memory; the trained base is then exactly the dequantized one).")
    liger: bool = doc(True, "Liger RMSNorm/SwiGLU/RoPE kernels on Llama/Qwen2/Mistral when liger_kernel is importable and training on CUDA; otherwise a logged no-op.")
    checkpoint_every: int = doc(1, "With model.gradient_checkpointing: checkpoint every k-th decoder layer only (1: all; larger: less recompute, more memory).")
    compile: bool = doc(False, "torch.compile each decoder layer (regional compilation); packed rows are then padded to data.max_seq_len, so every batch has one shape (one graph).")
    packed_attention: str = doc("auto", "How packed rows (data.packing) keep documents apart: varlen (per-document attention via cu_seqlens: torch's FlashAttention varlen kernel on CUDA in bf16/fp16, causal SDPA per document elsewhere; no L x L mask), mask (4D block-diagonal mask through SDPA), auto (varlen, except on a GPU without the kernel, i.e. fp32: mask).")
    peak_tflops: float = doc(0.0, "Peak dense bf16 TFLOP/s per GPU for MFU; 0: looked up from the GPU name (train/flops.py), none on CPU.")


@dataclass
class EvalConfig:
    every_n_steps: int = doc(0, "Run the in-training parts (eval.during_training) every N optimizer steps; the end-of-training parts always run at the end. 0: only at the end.")
    during_training: List[str] = doc(["lm"], "Parts run every every_n_steps: lm (held-out loss per source; cheap), intent, response.")
    at_end: List[str] = doc(["lm", "intent", "response"], "Parts run when training ends (parts without data are skipped); `dialtune eval` runs them too unless --parts says otherwise.")
    lm_max_batches: int = doc(0, "Cap on held-out LM micro-batches per rank; 0: the whole eval set.")
    base_comparison: bool = doc(True, "At the end, also measure the held-out loss with the adapter disabled (the base model), for the base vs fine-tuned table.")
    intent_files: List[str] = doc([], "Labelled utterances ({'text','label'}; JSONL/JSON/CSV/Parquet) for intent accuracy, rendered like data.intent records; empty: no intent eval.")
    intent_labels: List[str] = doc([], "The label set the classifier chooses from; empty: every label found in intent_files.")
    intent_modes: List[str] = doc(["loglik", "generate"], "loglik: pick the label with the highest log-likelihood (constrained choice); generate: greedy generation matched to a label (else counted unknown).")
    intent_max_examples: int = doc(200, "Utterances scored (the first N of intent_files); 0: all.")
    response_conversations: int = doc(32, "Held-out conversations whose last assistant turn is generated and scored (chrF, BLEU, ROUGE-L, stop and loop shares); 0: skip.")
    decoding: List[str] = doc(["greedy"], "Decodings for response quality: greedy and/or sampled.")
    temperature: float = doc(0.7, "Sampling temperature of the sampled decoding.")
    top_p: float = doc(0.9, "Nucleus sampling threshold of the sampled decoding.")
    max_new_tokens: int = doc(128, "Longest generated response in tokens.")
    batch_size: int = doc(8, "Sequences per forward (label scoring) or generate() batch.")
    samples: int = doc(8, "Conversations per decoding in the samples table (W&B table eval/samples, eval/samples.jsonl and .md).")
    seed: int = doc(0, "Seed of the sampled decoding.")


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
    verify_tolerance: float = doc(1e-4, "Largest |logit difference| (fp32) allowed between the merged model and its base (original or dequantized) + adapter; above fails the export.")
    base: str = doc("original", "Base the adapter is merged into: original (full-precision base) or dequantized (quantize->dequantize round trip of the quantized base the run trained against).")
    verify_dequantize_error: float = doc(0.05, "base=dequantized: largest relative output error of a dequantized layer against its quantized original (random input); above fails the export. The logits' distance to the quantized model as trained is reported, not checked.")
    eval_conversations: int = doc(64, "Eval-set conversations whose held-out loss export_summary.json reports for the adapter and each merge; 0 skips.")
    hub_repo_id: Optional[str] = doc(None, "Hugging Face repo id (org/name) the merged checkpoint is for: written push-ready (card metadata, loads by this id, no local paths, .gitattributes for LFS); upload with `hf upload <id> <run_dir>/merged`.")
    license: Optional[str] = doc(None, "License id in the merged model card's metadata: the base model's (e.g. llama3.1, apache-2.0), minding the training data's terms.")
    stream_above_gb: float = doc(12.0, "A base larger than this in fp32 is merged tensor by tensor (memory ~ one shard; Llama-3-8B ~5 GB) without the in-memory logits check; smaller bases merge in memory and are verified.")


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
    kernels: KernelsConfig = field(default_factory=KernelsConfig, metadata={"help": "Speed levers (each measured in bench/RESULTS.md)."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation suite (in training and `dialtune eval`)."})
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
        if key == "data.sources":
            yield from iter_docs(SourceConfig, key + "[].")


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


def unknown_key_problem(cfg) -> Optional[str]:
    """A key the schema does not have (Hydra's `+key=value` adds any key, a typo too), as one
    sentence with the nearest real key; None when every key is known."""
    import difflib

    from omegaconf.errors import ConfigKeyError

    try:
        # as plain data: merged as a typed node, an added key would ride along unchecked
        OmegaConf.merge(OmegaConf.structured(DialtuneConfig), OmegaConf.to_container(cfg))
    except ConfigKeyError as e:
        key = str(getattr(e, "full_key", "") or "?")
        near = difflib.get_close_matches(key, [k for k, *_ in iter_docs()], n=1, cutoff=0.6)
        return (f"{key} is not a config key" + (f" (did you mean {near[0]}?)" if near else "")
                + "; `dialtune config-doc` lists them all.")
    return None


def model_dir_problem(path: str, tok: Optional[str] = None, what: str = "model.name_or_path") -> Optional[str]:
    """What a local model directory (and model.tokenizer's) lacks, as one sentence; None for a
    complete one or a hub id."""
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
    return None


def validate(cfg, cuda_available: Optional[bool] = None) -> None:
    """Raise ConfigError (one sentence) for a config that cannot run."""
    problem = unknown_key_problem(cfg) or model_dir_problem(cfg.model.name_or_path, cfg.model.tokenizer)
    if problem:
        raise ConfigError(problem)
    for key, allowed in _CHOICES.items():
        if key.startswith("data."):
            continue  # validate_data() below checks these
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()

    q, p, ds, t = cfg.quant.mode, cfg.peft.method, cfg.deepspeed, cfg.train
    if q != "none" and p == "none":
        raise ConfigError(f"quant={q} freezes a quantized base, so it needs an adapter: set peft=lora (or dora/rslora), or quant=none for full fine-tuning.")
    if q == "int8" and p == "dora":
        raise ConfigError("peft=dora on quant=int8 fails in bitsandbytes' int8 backward; use peft=lora with int8, or quant=nf4 with DoRA.")
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
    if ds.offload_optimizer != "none" and cfg.optim.name != "cpu_adam":
        raise ConfigError(f"deepspeed.offload_optimizer={ds.offload_optimizer} steps the optimizer on the CPU, which optim={cfg.optim.name} cannot do: add optim=cpu_adam.")
    if cfg.optim.name == "cpu_adam" and ds.offload_optimizer == "none" and cuda_available:
        raise ConfigError("optim=cpu_adam keeps optimizer states on the CPU: use it with deepspeed.offload_optimizer=cpu (deepspeed=zero2_offload or zero3_offload).")
    if p != "none" and cfg.peft.r < 1:
        raise ConfigError(f"peft.r={cfg.peft.r} must be at least 1.")
    if t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.micro_batch_size and train.grad_accum must both be at least 1.")
    if t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps}: give a positive number of steps, or -1 for train.epochs full passes.")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs < 1):
        raise ConfigError("nothing to train: set train.max_steps to a positive number or train.epochs >= 1.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive.")
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too short to hold a conversation; use at least 16.")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1).")
    validate_data(cfg.data)
    validate_eval(cfg.eval)
    if cfg.kernels.ce_chunk_size < 1 or cfg.kernels.checkpoint_every < 1:
        raise ConfigError("kernels.ce_chunk_size and kernels.checkpoint_every must be at least 1.")
    if t.resume not in ("none", "auto"):
        from train.checkpoint import resume_path

        try:
            resume_path(t.resume)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.export.hub_repo_id:
        from model.card import repo_id_problem

        problem = repo_id_problem(cfg.export.hub_repo_id)
        if problem:
            raise ConfigError(f"export.hub_repo_id={cfg.export.hub_repo_id!r}: {problem}.")


def validate_eval(e) -> None:
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
        if not os.path.exists(path):
            raise ConfigError(f"eval.intent_files[{i}]: file {path!r} does not exist; check the path.")
    if e.batch_size < 1 or e.max_new_tokens < 1 or e.every_n_steps < 0:
        raise ConfigError("eval.batch_size and eval.max_new_tokens must be at least 1, eval.every_n_steps at least 0.")


def validate_data(d) -> None:
    """The data section alone (also what `dialtune prepare` checks)."""
    for key, allowed in _CHOICES.items():
        if key.startswith("data."):
            value = OmegaConf.select(d, key[5:])
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    if not d.train_files and not any(s.split == "train" for s in d.sources):
        raise ConfigError("no training data: pass data.train_files=[path/to/train.jsonl] or data.sources=[{path: ..., weight: 1}].")
    for key in ("train_files", "eval_files"):
        for i, path in enumerate(d[key]):
            if not os.path.exists(path):
                raise ConfigError(f"data.{key}[{i}]: file {path!r} does not exist; check the path (relative paths are taken from {os.getcwd()}).")
    for i, s in enumerate(d.sources):
        if not os.path.exists(s.path):
            raise ConfigError(f"data.sources[{i}].path: {s.path!r} does not exist; check the path.")
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight={s.weight} must be positive (remove the source to leave it out).")
        if s.format not in _CHOICES["data.format"]:
            raise ConfigError(f"data.sources[{i}].format={s.format!r} is not one of {', '.join(_CHOICES['data.format'])}.")
        if s.split not in ("train", "eval"):
            raise ConfigError(f"data.sources[{i}].split={s.split!r} must be train or eval.")
    if d.max_message_chars < 1 or d.max_errors_shown < 1 or d.num_proc < 1:
        raise ConfigError("data.max_message_chars, data.max_errors_shown and data.num_proc must be at least 1.")
