"""Tiny random models shared by the kernel tests."""
import pytest
import torch

from model import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(tie=False, vocab=96):
    """A 2-layer fp32 Llama (hidden 32, vocab 96 by default), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def with_lora(model, modules_to_save=None):
    """LoRA r4 on every linear layer, lora_B drawn non-zero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def loss_and_grads(model, fused, labels, **inputs):
    """(CE sum, trainable gradients) through the chunked CE (fused) or the full logits."""
    model.zero_grad(set_to_none=True)
    if fused:
        ce = kernels.fused_ce_sum(model, labels, chunk_size=16, **inputs)
    else:
        ce = kernels.token_ce_sum(model(**inputs).logits, labels)
    ce.backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
