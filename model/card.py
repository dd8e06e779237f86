"""The model card (README.md) of a merged checkpoint: base, adapter, quantization, verification,
training data with the bundled sample's license notice, held-out losses, and how to load it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data_pipeline" / "sample_data"


def _is_sample(path: str) -> bool:
    try:
        return Path(path).resolve().parent == SAMPLE_DATA
    except OSError:
        return False


def sample_license_notice() -> str:
    """The 'Licenses' section of data_pipeline/sample_data/README.md."""
    text = (SAMPLE_DATA / "README.md").read_text()
    start = text.find("Licenses")
    return text[start:].strip() if start >= 0 else text.strip()


def model_card(summary: Dict, cfg, peft_cfg, out_dir: str) -> str:
    name = os.path.basename(os.path.normpath(out_dir))
    if cfg is not None and name == "merged":
        name = f"{cfg.run.name} (merged)"
    lines = [f"# {name}", "", "Merged checkpoint written by dialtune (`dialtune merge`): the fine-tuned adapter is folded "
             "into the base weights, so it loads with plain transformers (no PEFT, no bitsandbytes).", ""]
    if cfg is not None and cfg.model.name_or_path == "tiny":
        base_desc = f"embedded tiny random Llama (`model=tiny`, seed {cfg.model.tiny.seed}), written to `{summary['base']}`"
    else:
        base_desc = f"`{cfg.model.name_or_path if cfg is not None else summary['base']}`"
        if cfg is not None and cfg.model.revision:
            base_desc += f" (revision `{cfg.model.revision}`)"
    method = cfg.peft.method if cfg is not None else ("dora" if getattr(peft_cfg, "use_dora", False) else
                                                        "rslora" if getattr(peft_cfg, "use_rslora", False) else "lora")
    targets = peft_cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    quant = summary["quant"]
    if cfg is not None and quant == "int8":
        qdesc = f"int8 (LLM.int8, bitsandbytes, outlier threshold {cfg.quant.int8_threshold})"
    elif cfg is not None and quant == "nf4":
        qdesc = f"nf4 (bitsandbytes, double quant {'on' if cfg.quant.double_quant else 'off'}, compute {cfg.quant.compute_dtype})"
    else:
        qdesc = "none"
    merged_into = ("the dequantized (quantize -> dequantize round trip) base the adapter was trained against"
                   if summary["merge_base"] == "dequantized" else "the original full-precision base")
    lines += ["## Model", "",
              "| | |", "|---|---|",
              f"| base model | {base_desc} |",
              f"| adapter | {method}, rank {peft_cfg.r}, alpha {peft_cfg.lora_alpha}, dropout {peft_cfg.lora_dropout} |",
              f"| adapter targets | {', '.join(f'`{t}`' for t in targets) if isinstance(targets, list) else f'`{targets}`'} |",
              f"| base quantization during training | {qdesc} |",
              f"| merged into | {merged_into} (`{summary['merge_base']}`) |",
              f"| weights dtype | {summary['dtype']} |",
              (f"| verification | max \\|logit difference\\| {summary['verify_max_abs_logit_diff']:.3g} vs {summary['verify_reference']} (tolerance {summary['verify_tolerance']}) |"
               if summary["verify_max_abs_logit_diff"] is not None else f"| verification | {summary['verify_reference']} |"),
              f"| resolved config sha256 | `{summary.get('config_sha256') or 'unknown'}` |", ""]
    if cfg is not None:
        lines += ["## Training data", ""]
        files = list(cfg.data.train_files)
        lines += [f"- `{f}`" for f in files]
        if list(cfg.data.eval_files):
            lines += ["", "Held out: " + ", ".join(f"`{f}`" for f in cfg.data.eval_files)]
        if any(_is_sample(f) for f in list(cfg.data.train_files) + list(cfg.data.eval_files)):
            lines += ["", "The bundled dialtune sample (`data_pipeline/sample_data/`) was used. Its license notice "
                      "(full license texts in `data_pipeline/sample_data/LICENSES/`):", ""]
            lines += ["> " + l if l else ">" for l in sample_license_notice().splitlines()]
        lines.append("")
    if summary.get("eval_loss"):
        ev = summary["eval"]
        labels = {"adapter": f"adapter on the base as trained ({quant if quant != 'none' else cfg.model.dtype})",
                  "merged_original": "merged into the original base", "merged_dequantized": "merged into the dequantized base"}
        lines += ["## Held-out loss", "",
                  f"Token-weighted cross-entropy over the assistant tokens of the first {ev['conversations']} conversations "
                  f"of the run's eval set ({ev['target_tokens']} target tokens); merged models in {summary['dtype']}.", "",
                  "| model | loss | perplexity |", "|---|---:|---:|"]
        for k, v in summary["eval_loss"].items():
            lines.append(f"| {labels.get(k, k)} | {v:.4f} | {summary['eval_ppl'][k]:.2f} |")
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"path = {out_dir!r}",
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path)",
              "messages = [{\"role\": \"user\", \"content\": \"Where is my order?\"}]",
              "text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
              "inputs = tok(text, return_tensors=\"pt\", add_special_tokens=False)",
              "out = model.generate(**inputs, max_new_tokens=128)  # stops at the end-of-turn token (generation_config.json)",
              "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", "",
              f"Or interactively: `dialtune chat {out_dir}`.", ""]
    return "\n".join(lines)
