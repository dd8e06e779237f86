"""Load the base model (dtype, attention, bitsandbytes quantization) and attach the adapter."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

TINY_TOKENIZER = Path(__file__).resolve().parent / "tiny" / "tokenizer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tokenizer_source(model_cfg, base_path: Optional[str] = None) -> str:
    if model_cfg.tokenizer:
        return model_cfg.tokenizer
    if model_cfg.name_or_path == "tiny" and base_path is None:
        return str(TINY_TOKENIZER)
    return base_path or model_cfg.name_or_path


def load_tokenizer(model_cfg, base_path: Optional[str] = None):
    from transformers import AutoTokenizer

    src = tokenizer_source(model_cfg, base_path)
    tok = AutoTokenizer.from_pretrained(src, revision=model_cfg.revision if src == model_cfg.name_or_path else None,
                                        trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A pad that equals eos would hide eos from the labels' padding logic: take a spare special
        # token the vocabulary has (Llama-3's <|finetune_right_pad_id|> / reserved ones), else add one
        # (the embeddings then grow by a row: fit_embeddings)
        spare = spare_special_token(tok, exclude=[*model_cfg.add_tokens, model_cfg.end_of_turn_token])
        if spare is not None:
            tok.pad_token = spare
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    new = [t for t in model_cfg.add_tokens if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


_SPARE = re.compile(r"pad|reserved|placeholder|unused", re.I)


def spare_special_token(tok, exclude=()) -> Optional[str]:
    """A special token of the vocabulary that nothing uses, to pad with: named like a pad, reserved,
    placeholder or unused token (pads first), not bos/eos/unk, not in a chat template of the
    tokenizer, not one of `exclude` (the run's own tokens: model.add_tokens, the end-of-turn token); or None."""
    templates = tok.chat_template if isinstance(tok.chat_template, dict) else {"": tok.chat_template or ""}
    template = "\n".join(t for t in templates.values() if isinstance(t, str))
    taken = {tok.bos_token, tok.eos_token, tok.unk_token, *exclude}
    spare = [(0 if "pad" in t.content.lower() else 1, i, t.content) for i, t in tok.added_tokens_decoder.items()
             if t.special and _SPARE.search(t.content) and t.content not in taken and t.content not in template]
    return min(spare)[2] if spare else None


def fit_embeddings(model, tokenizer):
    """Grow the input embeddings (and an untied output head) to the tokenizer's size, the new rows
    the mean of the old ones: the same rows in every process that builds the model (training,
    merge, eval). transformers' own resize draws them at random, so a merge in another process
    would hold other rows (an added pad's logit) than the adapter was trained with."""
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= old:
        return model
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
            emb.weight[old:] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)
    return model


TINY_MARKER = "dialtune_tiny.json"  # the model.tiny settings (and added tokens) a tiny base was built with


def _tiny_settings(model_cfg) -> dict:
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(model_cfg.tiny, resolve=True), "add_tokens": list(model_cfg.add_tokens)}


def tiny_base(model_cfg, run_dir: str, build: bool) -> str:
    """<run_dir>/base, the embedded tiny model as model.tiny describes it: built when missing, or
    rebuilt when built with other settings while no checkpoint depends on it (build: this rank
    writes); ValueError (one sentence) when checkpoints do. A base without the marker (older runs)
    is kept as it is."""
    base = os.path.join(run_dir, "base")
    marker = os.path.join(base, TINY_MARKER)
    if os.path.isfile(os.path.join(base, "config.json")):
        if not os.path.isfile(marker):
            return base
        with open(marker) as f:
            built = json.load(f)
        if built == _tiny_settings(model_cfg):
            return base
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
            changed = ", ".join(f"model.tiny.{k} {built.get(k)!r} -> {v!r}" if k != "add_tokens" else f"model.add_tokens -> {v!r}"
                                for k, v in _tiny_settings(model_cfg).items() if built.get(k) != v)
            raise ValueError(f"{base} was built with other tiny-model settings ({changed}) and this run's checkpoints need it: "
                             "keep them, or use another run.name.")
    if build:
        build_tiny(model_cfg, load_tokenizer(model_cfg), base)
    return base


def build_tiny(model_cfg, tokenizer, out_dir: str) -> str:
    """Write the embedded tiny random Llama (and its tokenizer) to out_dir; deterministic by seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = model_cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, TINY_MARKER), "w") as f:
        json.dump(_tiny_settings(model_cfg), f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def quantization_config(quant_cfg):
    from transformers import BitsAndBytesConfig

    if quant_cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant_cfg.int8_threshold)
    if quant_cfg.mode == "nf4":
        compute = DTYPES[quant_cfg.compute_dtype]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant_cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
            # Storage in the compute dtype lets ZeRO-3 partition the packed 4-bit weights.
            bnb_4bit_quant_storage=compute,
        )
    return None


def model_config(cfg, path: str):
    """The transformers config of the model at path (the run's revision and remote-code setting)."""
    from transformers import AutoConfig

    remote = bool(cfg is not None and cfg.model.trust_remote_code)
    revision = cfg.model.revision if cfg is not None and path == cfg.model.name_or_path else None
    return AutoConfig.from_pretrained(path, trust_remote_code=remote, revision=revision)


def empty_model(cfg, config):
    """The architecture of config, fp32, its parameters on the meta device (no memory, no init);
    buffers (RoPE's inverse frequencies) are computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                trust_remote_code=bool(cfg is not None and cfg.model.trust_remote_code))


def parameter_count(cfg, path: str) -> int:
    """How many parameters the model at path has, from its config alone."""
    return sum(p.numel() for p in empty_model(cfg, model_config(cfg, path)).parameters())


def load_base(cfg, path: str, device: torch.device, dtype: Optional[torch.dtype] = None, quantize: bool = True):
    """AutoModelForCausalLM from a hub id or directory, optionally bitsandbytes-quantized."""
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(cfg.quant) if quantize else None
    dtype = dtype or DTYPES[cfg.model.dtype]
    kwargs = dict(dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                  trust_remote_code=cfg.model.trust_remote_code)
    if path == cfg.model.name_or_path and cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "does not support an attention implementation" not in str(e):
            raise
        from train.config import ConfigError

        raise ConfigError(f"{str(e).split(' ')[0]} has no model.attn_implementation={cfg.model.attn_implementation} in this "
                          "transformers; set model.attn_implementation=eager.") from None
    if qconfig is None:
        model.to(device)
    portable_cpu_4bit(model)
    return model


def portable_cpu_4bit(model) -> int:
    """Keep bitsandbytes' portable 4-bit layout on CPUs with AVX512-BF16: there, a Linear4bit's
    first no-grad eval forward repacks its weight in place into a layout only that CPU kernel reads
    (and that asserts out_features % 32 == 0), so evaluation, merges and exports would depend on
    the machine and fail on small models. Returns how many layers it set."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _target_modules(peft_cfg):
    targets = list(peft_cfg.target_modules)
    return "all-linear" if targets == ["all-linear"] else targets


def _tied_target(model, targets) -> None:
    """LoRA on the input embeddings or output head of a model that ties them (one weight): merged,
    the update lands on both, and base + adapter is no longer what trained. Refused before training."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if targets == "all-linear" or inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", 0):
        return
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
    if hit := [t for t in targets if t in (names.get(id(inp)), names.get(id(out)))]:
        from train.config import ConfigError

        raise ConfigError(f"peft.target_modules has {', '.join(hit)}, and {type(model).__name__} ties its input embeddings "
                          f"and output head ({names.get(id(inp))} = {names.get(id(out))}, one weight), so a merged LoRA update "
                          "would change both: leave them out of peft.target_modules, or train them in full with "
                          f"peft.modules_to_save=[{names.get(id(inp))},{names.get(id(out))}].")


def _modules_to_save(model, cfg):
    """The user's list, plus the embeddings and output head when tokens were added (their new
    rows must be learnt, and they are saved with the adapter)."""
    names = list(cfg.peft.modules_to_save)
    modules = [n for n, _ in model.named_modules()]
    if unknown := [x for x in names if not any(n == x or n.endswith("." + x) for n in modules)]:  # (PEFT's own match)
        from train.config import ConfigError

        raise ConfigError(f"peft.modules_to_save has {unknown[0]!r}, which is no module of {type(model).__name__} (e.g. "
                          f"embed_tokens, lm_head: the names in model.named_modules()).")
    if cfg.model.add_tokens:
        by_module = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and by_module.get(id(emb)) not in names:
                names.append(by_module[id(emb)])
    return names


def attach_adapter(model, cfg):
    """Freeze the base, set up gradient checkpointing, wrap with PEFT (unless peft=none)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    p = cfg.peft
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (where the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if p.method == "none":
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    _tied_target(model, _target_modules(p))
    lora = LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=_target_modules(p),
        bias=p.bias,
        use_dora=p.method == "dora",
        use_rslora=p.method == "rslora",
        modules_to_save=_modules_to_save(model, cfg) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except NoMatchingPeftModuleError:
        from train.config import ConfigError

        from transformers.pytorch_utils import Conv1D  # (GPT-2's linear layers)

        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, (torch.nn.Linear, Conv1D)) or type(m).__name__ in ("Linear8bitLt", "Linear4bit")} - {"lm_head"})
        raise ConfigError(f"peft.target_modules={list(p.target_modules)} matches no layer of {type(model).__name__}; its linear "
                          f"layers are {', '.join(names)} (or use [all-linear]).") from None
    except ValueError as e:  # (PEFT's own sentence, e.g. "lora.ParamWrapper does not work with lora_dropout != 0.")
        if "ParamWrapper" not in str(e) or "dropout" not in str(e):
            raise
        from train.config import ConfigError

        raise ConfigError(f"{type(model).__name__} keeps its experts' weights as parameters, which PEFT adapts (peft.target_modules="
                          f"{list(p.target_modules)}) only without dropout: set peft.dropout=0, or peft.target_modules to "
                          "the attention layers (e.g. [q_proj,k_proj,v_proj,o_proj]).") from None


_LEARNED_POSITIONS = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"}  # a table of position embeddings: nothing past its end


def context_problem(model_config, max_seq_len: int) -> Optional[str]:
    """A warning when rows of data.max_seq_len tokens run past the positions the model was
    trained for (max_position_embeddings); None when they fit. ConfigError for a model whose
    positions are a learned table (its forward would fail on the first longer row)."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and max_seq_len > limit and getattr(model_config, "model_type", None) in _LEARNED_POSITIONS:
        from train.config import ConfigError

        raise ConfigError(f"data.max_seq_len={max_seq_len} is above the {limit} positions of this {model_config.model_type} model, "
                          f"whose learned position table has no entry past them: lower data.max_seq_len to {limit}.")
    if limit and max_seq_len > limit:
        return (f"data.max_seq_len={max_seq_len} is above the model's {limit} positions: tokens past {limit} sit at positions "
                f"it never saw (and learned position tables have no entry for them); lower data.max_seq_len to {limit}")
    return None
