"""The hand-written recipe dialtune is measured against, as a practitioner writes it from the
transformers/PEFT/bitsandbytes docs: `from_pretrained` with a BitsAndBytesConfig (LLM.int8 with
threshold 6.0, or NF4 + double quant + bf16 compute), `prepare_model_for_kbit_training`, LoRA
r16/alpha 32/dropout 0.05 on q,k,v,o,gate,up,down, SDPA, gradient checkpointing (non-reentrant),
HF Trainer with bf16 autocast, AdamW, batches of 8 conversations padded per batch
(DataCollatorForSeq2Seq, to a multiple of 8), full logits and the model's own loss.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from typing import Dict

import torch

from bench.common import DTYPES, LORA_TARGETS, Meter, TINY_TOKENIZER, batch_counts, conversations, reset_peak, say


class _CountingCollator:
    """DataCollatorForSeq2Seq that remembers each batch's token counts, in the order the Trainer
    asks for them (one worker, no shuffling inside a batch): batch k is step k + 1."""

    def __init__(self, inner):
        self.inner, self.counts = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        self.counts.append(batch_counts(batch["input_ids"], batch["labels"], batch["attention_mask"]))
        return batch


def run(spec: Dict, peak) -> Dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    device = torch.device(spec["device"])
    quant, dtype = spec["quant"], DTYPES[spec["quant"]]
    qconfig = None
    if quant == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "nf4":
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa",
                                                 quantization_config=qconfig, device_map={"": device})
    ckpt = {"use_reentrant": False}
    if qconfig is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=ckpt)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    bs, total = spec["batch_size"], spec["warmup"] + spec["steps"]
    data = conversations(spec["lengths"], spec["max_len"], model.config.vocab_size, bs * total, spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))  # only pads (pad id 0)
    collator = _CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8))
    meter = Meter(device, spec["warmup"], spec["steps"])

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step(state.global_step, collator.counts[state.global_step - 1])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=bs, max_steps=total, learning_rate=2e-4,
            lr_scheduler_type="constant", optim="adamw_torch", bf16=dtype == torch.bfloat16,
            gradient_checkpointing=True, gradient_checkpointing_kwargs=ckpt, logging_strategy="no",
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            remove_unused_columns=False, use_cpu=device.type == "cpu", seed=spec["seed"])
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Timing()])
        reset_peak(device)
        say(f"hf {quant}: {total} steps of {bs} conversations")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the table only
            trainer.train()
    return meter.result(model.config, peak)
