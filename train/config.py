"""Typed schema of the Hydra config tree (`conf/`).

The dataclasses are the schema, the YAML files hold values. Every field carries a one-line
`help` (shown by `dialtune config-doc` and in README's configuration reference); a test checks
that none is missing. train/validate.py rejects impossible combinations with one sentence each.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from data_pipeline.records import SAMPLE_DATA

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration a user can fix; the message is one sentence naming the field."""


def doc(default: Any, help: str, type_name: Optional[str] = None, **kw):
    """A dataclass field with a one-line description (type_name: the type the docs show, for an Any field)."""
    meta = {"help": help, **({"type": type_name} if type_name else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


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
    compute_dtype: str = doc("bf16", "Compute dtype of a quantized base, and the dtype the run trains in under quant=int8/nf4 (model.dtype is then that of the layers left unquantized): bf16, fp16 (GPU) or fp32 (int8 only; trains in bf16).")
    double_quant: bool = doc(True, "nf4 only: quantize the quantization constants too (saves ~0.4 bit/param).")
    int8_threshold: float = doc(6.0, "int8 only: LLM.int8 outlier threshold.")


@dataclass
class SourceConfig:
    path: str = doc("???", "File (JSONL/JSON/CSV/Parquet, optionally .gz) or saved `datasets` directory, or a glob pattern of them.")
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
    train_files: List[str] = doc([], "Training files or glob patterns (same as sources with weight 1); chat JSONL or any format below.")
    eval_files: List[str] = doc([], "Held-out files or glob patterns; empty: carve eval_fraction off the training data.")
    sources: List[SourceConfig] = doc([], "Weighted sources: [{path, weight, format, system_prompt, split}], added to train_files/eval_files.")
    format: str = doc("auto", "Format of every record unless a source sets its own: auto, messages, sharegpt, alpaca, prompt_completion, intent.")
    eval_fraction: float = doc(0.0, "Share of training conversations held out for eval when no eval files are given (deterministic).")
    max_seq_len: int = doc(2048, "Token budget of one conversation (and of one packed row).")
    truncation: str = doc("keep_recent", "Over-long conversations: keep_recent (drop the oldest turns, keep >= 1 assistant target; cut the end where even the last exchange is too long), right (cut the end) or drop.")
    labels: str = doc("all_assistant", "Which turns are targets: all_assistant or last_turn (only the final assistant turn); assistant messages with 'weight': 0 are never targets (context only).")
    chat_template: Optional[str] = doc(None, "Named template (chatml, llama-3, qwen2, mistral) for tokenizers without one, or to override theirs.")
    packing: bool = doc(False, "Pack several conversations per row (best-fit-decreasing) with boundary-safe attention.")
    on_error: str = doc("strict", "Bad records: strict (stop with file:line for the first errors) or lenient (skip, count, report).")
    max_errors_shown: int = doc(5, "strict: how many errors to collect before stopping.")
    utf16: str = doc("reject", "UTF-16 files: reject (with a message) or convert.")
    trailing_user: str = doc("trim", "Conversation ending with a user turn: trim it or reject the record.")
    same_role: str = doc("merge", "Consecutive turns of one role: merge them (joined by a newline) or reject the record.")
    long_message: str = doc("truncate", "Message longer than max_message_chars: truncate it or drop the record.")
    max_message_chars: int = doc(100_000, "Longest message in characters (before tokenization).")
    duplicate_ids: str = doc("reject", "Records repeating an earlier 'id' of the same source (file): reject (an error/skip) or keep; a null or blank id is none.")
    intent: IntentConfig = field(default_factory=IntentConfig, metadata={"help": "How intent records become conversations."})
    cache_dir: Optional[str] = doc(None, "Tokenized-data cache (shared or node-local); default ~/.cache/dialtune/data.")
    num_proc: int = doc(1, "Processes used for tokenization.")
    fast_tokenization: bool = doc(True, "Tokenize from the chat template read once (tiktoken for byte-level BPE) instead of rendering it per conversation; used only where it gives the same tokens as the template on the first 64 conversations; false builds with the template per conversation (a cache entry of its own).")
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
    min_lr_ratio: float = doc(0.1, "LR of the last step as a share of the peak (cosine and linear; the peak is reached at the end of warmup, or at step 1).")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")


@dataclass
class TrainConfig:
    micro_batch_size: int = doc(4, "Conversations per rank per forward pass.")
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    global_batch_size: int = doc(0, "Conversations (or packed rows) per optimizer step over all ranks; when set, it wins: grad_accum = global / (micro x ranks), which must divide.")
    max_steps: int = doc(-1, "Optimizer steps to run; -1 runs `epochs` full passes.")
    epochs: int = doc(1, "Passes over the training data when max_steps is -1; every example is trained once a pass (the pass's last micro-batch across ranks is filled up with rows without targets), rounded up to whole optimizer steps (the last may take a few micro-batches of the next pass).")
    save_every: int = doc(0, "Save a checkpoint every N optimizer steps (and at the end); 0: only at the end.")
    log_every: int = doc(1, "Write metrics every N optimizer steps (and at each eval, each skipped step and a job's last step).")
    seed: int = doc(42, "Seed of model init (adapters) and dropout; the data order follows data.seed.")
    resume: str = doc("none", "none, auto (latest checkpoint of this run directory), a checkpoint directory (checkpoints/step_N), or another run's directory, checkpoints/ or latest file (its latest checkpoint).")
    stop_after_steps: int = doc(0, "Stop this job (with a checkpoint) after N optimizer steps; resume later with train.resume=auto. 0: run to the end.")
    progress_bar: bool = doc(True, "Show a progress bar on rank 0.")
    nonfinite: str = doc("skip", "Non-finite loss (agreed over all ranks): skip the update (counted, logged; the bad micro-batches give zero gradients and the optimizer step does not run: weights and optimizer state unchanged) or stop (save the last good state, exit 3).")
    max_nonfinite_in_row: int = doc(3, "skip: stop like `stop` after more than this many non-finite steps in a row.")
    keep_checkpoints: int = doc(3, "Keep the newest N complete checkpoints (0: keep all).")


@dataclass
class KernelsConfig:
    fused_ce: bool = doc(True, "Chunked linear + cross-entropy over target positions only: the [tokens, vocab] logits never materialise (same loss); falls back to full logits under ZeRO-3, for models that transform their logits, and with an adapter on lm_head.")
    ce_chunk_size: int = doc(1024, "Target rows per chunk of the fused cross-entropy (~1.3 GB of fp32 temporaries per 1024 rows at a 128k vocabulary).")
    fast_int8: bool = doc(True, "quant=int8: dequantise the int8 weights per layer into 16-bit GEMMs instead of LLM.int8's int8 matmul with outlier decomposition (same int8 weight memory; the trained base is then exactly the dequantized one).")
    fused_lora: bool = doc(False, "LoRA/rsLoRA under ZeRO 0-2: PEFT's adapter branches as autograd functions that keep less for backward, with the same masks, function and gradients: each branch keeps its input once and replays its dropout from the saved random state; q/k/v's and gate/up's input (an RMSNorm output) is recomputed from the norm's input; a SwiGLU MLP keeps gate and up and recomputes down_proj's input (Llama-3-8B: 0.38 instead of 0.84 GiB per un-checkpointed layer at 4,096 tokens; more layers fit kernels.memory_budget_gib); not with kernels.compile. Off by default until its speed is measured (bench/RESULTS.md).")
    liger: bool = doc(True, "Liger RMSNorm/SwiGLU/RoPE kernels on Llama/Qwen2/Mistral when liger_kernel is importable and training on CUDA; otherwise a logged no-op.")
    checkpoint_every: int = doc(1, "With model.gradient_checkpointing: checkpoint every k-th decoder layer only (1: all; larger: less recompute, more memory).")
    memory_budget_gib: Any = doc(0.0, "With model.gradient_checkpointing on CUDA (ZeRO 0-2; LoRA/rsLoRA; int8 with fast_int8): GiB of PyTorch-allocated GPU memory per rank to fill (leave 3-4 GiB of the card free), or auto (what the GPU has free once the model is loaded, PyTorch's own cache included, less 10% of the card, at least 4 GiB; the smallest over the ranks); as many decoder layers as fit keep their activations instead of recomputing them (estimated from the model shape and train.micro_batch_size x data.max_seq_len tokens; model/memory.py). 0: off (checkpoint_every decides).", type_name="float or auto")
    compile: bool = doc(False, "torch.compile each decoder layer (regional compilation); packed rows are then padded to data.max_seq_len, so every batch has one shape (one graph).")
    packed_attention: str = doc("auto", "How packed rows (data.packing) keep documents apart: varlen (per-document attention via cu_seqlens: torch's FlashAttention varlen kernel on CUDA in bf16/fp16, causal SDPA per document elsewhere; no L x L mask), mask (4D block-diagonal mask through SDPA), auto (varlen, except on a GPU without the kernel, i.e. fp32: mask).")
    peak_tflops: float = doc(0.0, "Peak dense bf16 TFLOP/s per GPU for MFU; 0: looked up from the GPU name (train/flops.py), none on CPU.")


@dataclass
class EvalConfig:
    every_n_steps: int = doc(0, "Run the in-training parts (eval.during_training) every N optimizer steps; the end-of-training parts always run at the end. 0: only at the end.")
    during_training: List[str] = doc(["lm"], "Parts run every every_n_steps: lm (held-out loss per source; cheap), intent, response.")
    early_stopping_patience: int = doc(0, "Stop training after this many in-training evaluations in a row whose held-out loss did not improve on the lowest so far by more than early_stopping_min_delta (needs every_n_steps, lm in during_training and a held-out set); the run then ends as a finished one: end-of-training eval, checkpoint, merge (pair with export.checkpoint=best to export the lowest-loss checkpoint). 0: off.")
    early_stopping_min_delta: float = doc(0.0, "Smallest drop of the held-out loss that counts as an improvement for early_stopping_patience.")
    at_end: List[str] = doc(["lm", "intent", "response"], "Parts run when training ends (parts without data are skipped); `dialtune eval` runs them too unless --parts says otherwise.")
    lm_max_batches: int = doc(0, "Cap on held-out LM micro-batches per rank: training reads the eval set's first cap x ranks micro-batches, and `dialtune eval` of the run the same ones; 0: the whole eval set.")
    base_comparison: bool = doc(True, "At the end, also measure the held-out loss with the adapter disabled (the base model), for the base vs fine-tuned table; a full fine-tune (peft=none) measures its base before the first step.")
    intent_files: List[str] = doc([], "Labelled utterances ({'text','label'}; JSONL/JSON/CSV/Parquet) for intent accuracy, rendered like data.intent records; empty: no intent eval.")
    intent_labels: List[str] = doc([], "The label set the classifier chooses from (utterances with other labels are left out); empty: every label found in intent_files.")
    intent_modes: List[str] = doc(["loglik", "generate"], "loglik: pick the label with the highest log-likelihood (constrained choice); generate: greedy generation matched to a label (else counted unknown).")
    intent_max_examples: int = doc(200, "Utterances scored: a fixed random sample of N (seed 0) of intent_files; 0: all.")
    response_conversations: int = doc(32, "Held-out conversations (a fixed seeded sample of the whole eval set) whose last trained reply is generated and scored (chrF, BLEU, ROUGE-L, stop and loop shares); 0: skip.")
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
    mode: str = doc("auto", "W&B mode: auto (WANDB_MODE if set, else online when W&B has an API key: WANDB_API_KEY or `wandb login`, else offline), online or offline.")
    tags: List[str] = doc([], "W&B run tags.")


@dataclass
class ExportConfig:
    merge_at_end: bool = doc(True, "Write a merged checkpoint (<run_dir>/merged; a full fine-tune: its trained weights) when training ends.")
    checkpoint: str = doc("last", "Which checkpoint the end-of-training export merges: last, or best (the lowest held-out loss among the checkpoints, each measured at its step: eval.every_n_steps must divide train.save_every, with lm in eval.during_training; train.keep_checkpoints never deletes it).")
    dtype: str = doc("auto", "Dtype of the merged weights: auto (the run's model.dtype; bf16 for an int8/nf4 base; fp32 when the run's config is missing), fp32, bf16 or fp16.")
    max_shard_size: str = doc("2GB", "Largest safetensors shard of the merged checkpoint.")
    verify_tolerance: float = doc(1e-4, "Largest |logit difference| (fp32) allowed between the merged model and its base (original or dequantized) + adapter (a full fine-tune: between the checkpoint as written and its trained weights); above fails the export.")
    base: str = doc("original", "Base the adapter is merged into: original (full-precision base) or dequantized (quantize->dequantize round trip of the quantized base the run trained against).")
    verify_dequantize_error: float = doc(0.05, "base=dequantized: largest relative output error of a dequantized layer against its quantized original (random input); above fails the export. The logits' distance to the quantized model as trained is reported, not checked.")
    eval_conversations: int = doc(64, "Eval-set conversations whose held-out loss export_summary.json reports for the adapter and each merge; 0 skips.")
    hub_repo_id: Optional[str] = doc(None, "Hugging Face repo id (org/name) the merged checkpoint is for: written push-ready (card metadata, loads by this id, no local paths, .gitattributes for LFS); upload with `hf upload <id> <run_dir>/merged`.")
    license: Optional[str] = doc(None, "License id in the merged model card's metadata: the base model's (e.g. llama3.1, apache-2.0), minding the training data's terms.")
    stream_above_gb: float = doc(12.0, "A base larger than this in fp32 is merged tensor by tensor (memory ~ one shard; Llama-3-8B: 3.4 GiB allocated, measured) without the in-memory logits check; smaller bases merge in memory and are verified.")


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


def flatten(d: Dict[str, Any], sep: str = ".", prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (with `sep` between the levels); non-dict values as they are."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sample(name: str) -> str:
    return str(SAMPLE_DATA / name)


DATA_DIR_DEFAULT = str(REPO_ROOT.parent / "shared" / "data")  # conf/data/customer_service.yaml without DIALTUNE_DATA_DIR


def data_dir() -> str:
    """Where data=customer_service reads: $DIALTUNE_DATA_DIR, else a shared/data folder beside the
    project's; absolute, so that a run's config.yaml (read again by eval, merge, resume) does not
    depend on the directory it was started from."""
    return os.path.abspath(os.environ.get("DIALTUNE_DATA_DIR") or DATA_DIR_DEFAULT)


def absolute_paths(cfg) -> None:
    """Local paths of the config (a model or tokenizer directory, data files and patterns, intent
    files) made absolute in place, so that the run's config.yaml, read again by merge, eval, report
    and resume, means the same files from any directory. Hub ids (no such local path) stay as given."""
    def local(p):
        return os.path.abspath(p) if isinstance(p, str) and p and not os.path.isabs(p) and os.path.exists(p) else p

    def pattern(p):  # (a glob or a file that is missing now: made absolute too, relative to where the run starts)
        return os.path.abspath(p) if isinstance(p, str) and p and not os.path.isabs(p) and p != "???" else p

    m, d = cfg.model, cfg.data
    m.name_or_path = local(m.name_or_path) if m.name_or_path != "tiny" else m.name_or_path
    m.tokenizer = local(m.tokenizer)
    d.train_files = [pattern(p) for p in d.train_files]
    d.eval_files = [pattern(p) for p in d.eval_files]
    for src in d.sources:
        src.path = pattern(src.path)
    cfg.eval.intent_files = [pattern(p) for p in cfg.eval.intent_files]


def _data_dir(name: str) -> str:
    return os.path.join(data_dir(), name)


def run_label(run_dir) -> Tuple[str, Optional[str]]:
    """(label, sweep) of a run directory: a sweep job's `<name>-sweep/<job>` and `<name>-sweep`
    (conf/train.yaml: hydra.sweep.dir), else its folder's name and None."""
    leaf, parent = (os.path.basename(p) for p in (os.path.normpath(str(run_dir)), os.path.dirname(os.path.normpath(str(run_dir)))))
    return (f"{parent}/{leaf}", parent) if parent.endswith("-sweep") else (leaf, None)


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(str(path))) or "model"


def register() -> None:
    """Register the schema with Hydra's ConfigStore and the resolvers the YAML uses."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", _sample)
        OmegaConf.register_new_resolver("basename", _basename)
        OmegaConf.register_new_resolver("data_dir", _data_dir)
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
        tname = f.metadata.get("type") or (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
        yield key, tname, default, f.metadata.get("help", "")
        if key == "data.sources":
            yield from iter_docs(SourceConfig, key + "[].")
