"""The model card (README.md) of a merged checkpoint: Hugging Face metadata (front matter), base,
adapter, quantization, verification, training data with the bundled sample's license notice,
held-out losses, and how to load it.

Push-ready layout (`export.hub_repo_id`): the card loads the model by its repo id, local paths
are shown by their last component only (here and in export_summary.json), and a `.gitattributes`
stores the weights and the tokenizer with Git LFS, so the directory can be uploaded as it is
(`hf upload <repo id> <dir>`, or `git push` to the repo)."""
from __future__ import annotations

import os
from typing import Dict, Optional

from data_pipeline.records import SAMPLE_DATA, is_bundled_sample

from .dequantize import fast_int8


def sample_license_notice() -> str:
    """The 'Licenses' section of data_pipeline/sample_data/README.md."""
    text = (SAMPLE_DATA / "README.md").read_text()
    start = text.find("Licenses")
    return text[start:].strip() if start >= 0 else text.strip()


# Git LFS for what the Hub stores as large files (its own .gitattributes for new model repos, less
# the formats a merged transformers checkpoint never has)
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.model", "*.gguf", "tokenizer.json"))
_PATH_KEYS = ("base", "adapter", "run_dir", "checkpoint")


def repo_id_problem(repo_id: str) -> Optional[str]:
    """Why `repo_id` is not a Hugging Face model repo id (None when it is)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).split(". Use `repo_type`")[0].rstrip(".")  # (that hint is for datasets and spaces)
    return None


def is_local(path: Optional[str]) -> bool:
    return bool(path) and (os.path.isabs(path) or os.path.exists(path) or path.startswith("."))


def public(path: Optional[str]) -> Optional[str]:
    """A local path as its last component (a Hub id as it is): nothing of this machine's file
    system goes into a pushed repo."""
    return os.path.basename(os.path.normpath(path)) if is_local(path) else path


def public_summary(summary: Dict) -> Dict:
    out = {k: (public(v) if k in _PATH_KEYS else v) for k, v in summary.items()}
    if "eval" in out:
        out["eval"] = {**out["eval"], "set": public(out["eval"]["set"])}
    return out


def _hub_base(summary: Dict, cfg) -> Optional[str]:
    """The base model's Hub id, or None for a local directory (or the embedded tiny model)."""
    name = cfg.model.name_or_path if cfg is not None else summary["base"]
    return None if name == "tiny" or is_local(name) else name


def front_matter(summary: Dict, cfg, method: str, license: Optional[str]) -> str:
    from huggingface_hub import ModelCardData

    base = _hub_base(summary, cfg)
    tags = ["dialtune", method, "conversational", "text-generation"]
    if summary["quant"] != "none":
        tags.append(f"{summary['quant']}-trained")
    data = ModelCardData(license=license, library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=base, base_model_relation="finetune" if base else None)
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(summary: Dict, cfg, peft_cfg, out_dir: str, hub_repo_id: Optional[str] = None,
               license: Optional[str] = None) -> str:
    """README.md of a merged checkpoint; with hub_repo_id, push-ready (see the module docstring)."""
    show = public if hub_repo_id else (lambda p: p)
    name = hub_repo_id or os.path.basename(os.path.normpath(out_dir))
    if cfg is not None and name == "merged":
        name = f"{cfg.run.name} (merged)"
    full = summary["merge_base"] == "full"  # a full fine-tune (peft=none): its trained weights, no adapter
    method = ("full" if full else cfg.peft.method if cfg is not None else
              "dora" if getattr(peft_cfg, "use_dora", False) else "rslora" if getattr(peft_cfg, "use_rslora", False) else "lora")
    what = ("Full fine-tune written by dialtune (`dialtune merge`): every weight of the base was trained; the weights come from "
            "a DeepSpeed checkpoint of the run (below)" if full else
            "Merged checkpoint written by dialtune (`dialtune merge`): the fine-tuned adapter is folded into the base weights")
    lines = [front_matter(summary, cfg, method, license), f"# {name}", "", f"{what}, so it loads with plain transformers "
             "(no PEFT, no bitsandbytes).", ""]
    if cfg is not None and cfg.model.name_or_path == "tiny":
        base_desc = f"embedded tiny random Llama (`model=tiny`, seed {cfg.model.tiny.seed}), written to `{show(summary['base'])}`"
    else:
        base_desc = f"`{show(cfg.model.name_or_path if cfg is not None else summary['base'])}`"
        if cfg is not None and cfg.model.revision:
            base_desc += f" (revision `{cfg.model.revision}`)"
    targets = None if full else peft_cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    quant = summary["quant"]
    if cfg is not None and quant == "int8" and fast_int8(cfg):  # what ran: no LLM.int8 matmul, no outlier threshold
        qdesc = (f"int8 (bitsandbytes int8 weights, dequantized per layer into {cfg.quant.compute_dtype} GEMMs by `kernels.fast_int8`; "
                 "no outlier decomposition)")
    elif cfg is not None and quant == "int8":
        qdesc = f"int8 (LLM.int8, bitsandbytes, outlier threshold {cfg.quant.int8_threshold})"
    elif cfg is not None and quant == "nf4":
        qdesc = f"nf4 (bitsandbytes, double quant {'on' if cfg.quant.double_quant else 'off'}, compute {cfg.quant.compute_dtype})"
    else:
        qdesc = "none"
    merged_into = ("the dequantized (quantize -> dequantize round trip) base the adapter was trained against"
                   if summary["merge_base"] == "dequantized" else "the original full-precision base")
    if full:
        trained = ["| training | full fine-tuning (`peft=none`), every parameter trained |",
                   f"| weights from | `{show(summary['checkpoint'])}` |"]
    else:
        trained = [f"| adapter | {method}, rank {peft_cfg.r}, alpha {peft_cfg.lora_alpha}, dropout {peft_cfg.lora_dropout} |",
                   f"| adapter targets | {', '.join(f'`{t}`' for t in targets) if isinstance(targets, list) else f'`{targets}`'} |",
                   f"| base quantization during training | {qdesc} |",
                   f"| merged into | {merged_into} (`{summary['merge_base']}`) |"]
    lines += ["## Model", "",
              "| | |", "|---|---|",
              f"| base model | {base_desc} |",
              *trained,
              f"| weights dtype | {summary['dtype']} |",
              (f"| verification | max \\|logit difference\\| {summary['verify_max_abs_logit_diff']:.3g} vs {summary['verify_reference']} (tolerance {summary['verify_tolerance']:.3g}) |"
               if summary["verify_max_abs_logit_diff"] is not None else f"| verification | {summary['verify_reference']} |"),
              *([f"| as written ({summary['as_written']['dtype']}) | max \\|logit difference\\| {summary['as_written']['max_abs_logit_diff']:.3g} "
                 + ("vs the trained fp32 weights (the cast's rounding) |" if full else
                    "vs the same reference (the cast's rounding; the check above is in fp32) |")] if summary.get("as_written") else []),
              f"| resolved config sha256 | `{summary.get('config_sha256') or 'unknown'}` |"]
    check = summary.get("dequantize_check")
    if check and summary["merge_base"] == "dequantized":
        lines.append(f"| dequantization check | worst layer reproduces its {quant} original to {check['max_rel_error']:.2%} relative "
                     f"output error (`{check['worst_layer']}`, limit {check['limit']:.0%}) |")
    far = (summary.get("max_abs_logit_diff_vs_quantized") or {}).get(summary["merge_base"])
    if far is not None:
        lines.append(f"| distance to the {quant} model as trained | max \\|logit difference\\| {far:.3g}, mean "
                     f"{summary['mean_abs_logit_diff_vs_quantized'][summary['merge_base']]:.3g} (its logits' std "
                     f"{summary['quantized_logit_std']:.3g}; quantized kernels round differently, see the held-out losses) |")
    lines.append("")
    if cfg is not None:
        lines += ["## Training data", ""]
        sources = list(cfg.data.get("sources") or [])
        files = list(cfg.data.train_files) + [s.path for s in sources if s.get("split", "train") == "train"]
        held_out = list(cfg.data.eval_files) + [s.path for s in sources if s.get("split", "train") == "eval"]
        lines += [f"- `{show(f)}`" for f in files]
        if held_out:
            lines += ["", "Held out: " + ", ".join(f"`{show(f)}`" for f in held_out)]
        if any(is_bundled_sample(f) for f in files + held_out):
            lines += ["", "The bundled dialtune sample (`data_pipeline/sample_data/`) was used. Its license notice "
                      "(full license texts in `data_pipeline/sample_data/LICENSES/`):", ""]
            lines += ["> " + l if l else ">" for l in sample_license_notice().splitlines()]
        lines.append("")
    if summary.get("eval_loss"):
        ev = summary["eval"]
        labels = {"adapter": f"adapter on the base as trained ({quant if quant != 'none' else cfg.model.dtype})",
                  "merged_original": "merged into the original base", "merged_dequantized": "merged into the dequantized base",
                  "full": "the fine-tuned model as written", "training": "the same, measured by the training run (its final eval)"}
        lines += ["## Held-out loss", "",
                  f"Token-weighted cross-entropy over the assistant tokens of the first {ev['conversations']} conversations "
                  f"of the run's eval set ({ev['target_tokens']} target tokens); merged models in {summary['dtype']}.", "",
                  "| model | loss | perplexity |", "|---|---:|---:|"]
        for k, v in summary["eval_loss"].items():
            lines.append(f"| {labels.get(k, k)} | {v:.4f} | {summary['eval_ppl'][k]:.2f} |")
        lines.append("")
    lines += ["## License", "",
              (f"`{license}` (`export.license`)." if license else "No license id was set for this checkpoint (`export.license`).")
              + " The base model's license and the terms of the training data apply to it as well.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"path = {hub_repo_id or os.path.abspath(out_dir)!r}",  # (a relative --out: where it is, from anywhere)
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path)",
              "messages = [{\"role\": \"user\", \"content\": \"Where is my order?\"}]",
              "text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
              "inputs = tok(text, return_tensors=\"pt\", add_special_tokens=False)",
              "out = model.generate(**inputs, max_new_tokens=128)  # stops at the end-of-turn token (generation_config.json)",
              "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", "",
              (f"Or interactively: `hf download {hub_repo_id} --local-dir model && dialtune chat model`." if hub_repo_id
               else f"Or interactively: `dialtune chat {os.path.abspath(out_dir)}`."), ""]
    return "\n".join(lines)
