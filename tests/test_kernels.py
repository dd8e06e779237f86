"""model/kernels.py: the chunked linear+CE equals logits+CE (values and gradients), also through a
PEFT model and on packed rows; the dequantising int8 linear matches its bf16 source within int8
error and trains LoRA; Liger, selective checkpointing and regional compile plumbing."""
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from data_pipeline.batching import collate, target_tokens
from data_pipeline.packing import collate_packed
from model import kernels
from tests.conftest import ROOT
from train.recipe import token_ce_sum

IGNORE = -100
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _labels(B, T, V, share=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > share] = IGNORE
    return labels


def _reference(hidden, weight, labels):
    return token_ce_sum(hidden @ weight.t(), labels)


def _both(hidden, weight, labels, chunk_size):
    """(loss, grad hidden, grad weight) of the reference and of the chunked path."""
    out = []
    for fn in (_reference, lambda h, w, y: kernels.chunked_linear_ce_sum(h, w, y, chunk_size=chunk_size)):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(weight.requires_grad)
        loss = fn(h, w, labels)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    return out


def test_chunked_ce_equals_full_logits_fp32_with_trainable_weight():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 19, 16), torch.randn(50, 16, requires_grad=True)
    labels = _labels(3, 19, 50)
    (ref, ref_h, ref_w), (got, got_h, got_w) = _both(hidden, weight, labels, chunk_size=7)  # 7 does not divide
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=1e-5)


def test_chunked_ce_bf16_within_bf16_tolerance_and_frozen_weight_gets_no_grad():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 33, 32).bfloat16(), (torch.randn(64, 32) * 0.2).bfloat16()
    labels = _labels(2, 33, 64, share=0.7)
    (ref, ref_h, ref_w), (got, got_h, got_w) = _both(hidden, weight, labels, chunk_size=8)
    assert ref_w is None and got_w is None
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-2)
    assert got_h.dtype == torch.bfloat16
    torch.testing.assert_close(got_h.float(), ref_h.float(), rtol=2e-2, atol=2e-3)


def test_chunked_ce_with_no_target_is_zero_and_still_backpropagates():
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 9), IGNORE)
    labels[:, 0] = 3  # position 0 is never predicted: still no target
    loss = kernels.chunked_linear_ce_sum(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and _reference(hidden, weight, labels).item() == 0.0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def _tiny_llama(tie=False, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def _lora(model, modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(model, fused, labels, **inputs):
    model.zero_grad(set_to_none=True)
    if fused:
        ce = kernels.fused_ce_sum(model, labels, chunk_size=16, **inputs)
    else:
        ce = token_ce_sum(model(**inputs).logits, labels)
    ce.backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "lora_tied_head_trained", "plain_full_finetune"])
def test_fused_ce_equals_logits_path(kind):
    """Loss and every trainable gradient: PeftModel(Llama) with a frozen head, with a tied head in
    modules_to_save (the weight gets its gradient), and a plain Llama with everything trainable."""
    save_head = kind == "lora_tied_head_trained"
    if kind == "plain_full_finetune":
        model = _tiny_llama()
    else:
        model = _lora(_tiny_llama(tie=save_head), modules_to_save=["lm_head"] if save_head else None)
    assert kernels.fused_ce_unsupported(model) is None
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = torch.where(torch.arange(24) >= 10, ids, IGNORE)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels[1, 20:] = IGNORE
    ref, ref_g = _loss_and_grads(model, False, labels, input_ids=ids, attention_mask=mask)
    got, got_g = _loss_and_grads(model, True, labels, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert got_g.keys() == ref_g.keys() and any("lm_head" in n for n in got_g) == (kind != "lora")
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
    assert model(input_ids=ids).logits.shape[-1] == 96  # the head's forward is back



def test_fused_ce_refuses_a_head_with_an_adapter():
    """LoRA on lm_head: the head's .weight is the base weight alone, so the fused loss would drop
    the adapter's term and its gradient; the recipe computes full logits instead (and says why)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert "adapter" in kernels.fused_ce_unsupported(model)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.where(torch.arange(16) >= 4, ids, IGNORE)
    ref, ref_g = _loss_and_grads(model, False, labels, input_ids=ids)
    assert any("lm_head.lora_B" in n for n in ref_g)  # the full-logits path trains the head's adapter
    with torch.no_grad():
        fused = kernels.fused_ce_sum(model, labels, chunk_size=16, input_ids=ids)
    assert (fused - ref).abs() > 1e-3  # what the check prevents: the fused path ignores that adapter

def _conversations(n=5, vocab=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        L = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(1, vocab, (L,), generator=g).tolist()
        cut = L // 3
        docs.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]})
    return docs


def _packed_and_padded_losses(dtype, device="cpu", layout="sdpa"):
    """Per-target-token loss of the same conversations: packed rows (block-diagonal mask, or
    varlen per document) + fused CE, and padded batches + full logits (packing never predicts a
    document's first token from the previous one; neither does padding)."""
    from model import attention

    model = _lora(_tiny_llama()).to(device=device, dtype=dtype)
    docs = _conversations()
    with torch.no_grad():
        padded = {k: v.to(device) for k, v in collate(docs, pad_id=0).items()}
        ref = token_ce_sum(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                           padded["labels"])
        packed = {k: v.to(device) if torch.is_tensor(v) else v
                  for k, v in collate_packed([docs[:3], docs[3:]], pad_id=0, attn_implementation=layout, dtype=dtype).items()}
        if layout == "varlen":
            assert attention.choose("varlen", model, torch.device(device), dtype)[0] == "varlen"
        with attention.packed_forward() if layout == "varlen" else torch.no_grad():
            got = kernels.fused_ce_sum(model, packed["labels"], **{k: v for k, v in packed.items() if k != "labels"})
    n = target_tokens(padded)
    assert n == target_tokens(packed) > 0
    return got / n, ref / n


@pytest.mark.parametrize("layout", ["sdpa", "varlen"])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 0.0), (torch.bfloat16, 0.0, 4e-3)])
def test_packed_fused_loss_equals_unpacked_unfused_loss(dtype, atol, rtol, layout):
    """The correctness bar of the speed path (both packed attention paths)."""
    got, ref = _packed_and_padded_losses(dtype, layout=layout)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


def test_hidden_states_as_logits_restores_a_shadowed_forward():
    model = _tiny_llama()
    head = model.get_output_embeddings()
    hook = head.forward  # what accelerate's hooks leave on the instance
    head.forward = hook
    ids = torch.randint(1, 96, (1, 5))
    with kernels.hidden_states_as_logits(model) as weight:
        assert weight is head.weight and model(input_ids=ids).logits.shape[-1] == 32
    assert head.__dict__["forward"] is hook and model(input_ids=ids).logits.shape[-1] == 96


def test_fused_ce_unsupported_names_the_reason():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in kernels.fused_ce_unsupported(model)


# ---- int8 ------------------------------------------------------------------------------------


def _int8_pair(bias=True):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 48, bias=bias)
    q = bnb.nn.Linear8bitLt(64, 48, bias=bias, has_fp16_weights=False, threshold=6.0)
    q.load_state_dict(ref.state_dict())
    return ref, q.to("cpu")  # quantizes (bitsandbytes' CPU backend)


def test_int8_dequant_linear_matches_bf16_reference_within_int8_error():
    import bitsandbytes.functional as bnbf

    ref, q = _int8_pair()
    fast = kernels.Int8DequantLinear(q)
    w = bnbf.int8_vectorwise_dequant(q.weight.data, q.weight.SCB)
    torch.testing.assert_close(kernels.dequantize(q.weight.data, q.weight.SCB, torch.float32), w, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 7, 64)
    # |dW| <= SCB / 127 / 2 per row (round to nearest), so |dy| <= sum|x| * that
    bound = x.abs().sum(-1, keepdim=True) * (q.weight.SCB / 254.0) + 1e-5
    with torch.no_grad():
        want = ref(x)
        got = fast(x)
        got_bf16 = fast(x.bfloat16())
        bnb_out = q(x)  # moves CB/SCB into q.state: the replacement must not care
    assert (got - want).abs().le(bound).all()
    assert got_bf16.dtype == torch.bfloat16
    assert (got_bf16.float() - want).abs().le(bound + 0.02 * want.abs() + 0.02).all()
    assert (got - want).abs().max() <= (bnb_out - want).abs().max() + 1e-6  # no activation quantisation error
    again = kernels.Int8DequantLinear(q)
    with torch.no_grad():
        torch.testing.assert_close(again(x), got)
    assert set(again.state_dict()) == set(q.state_dict()) - {"weight_format"}  # checkpoints stay compatible


def test_int8_dequant_linear_backward_reaches_input_only():
    ref, q = _int8_pair(bias=False)
    fast = kernels.Int8DequantLinear(q)
    x = torch.randn(4, 64, requires_grad=True)
    fast(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    w = kernels.dequantize(q.weight.data, fast.SCB, torch.float32)
    (xr @ w.t()).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert q.weight.grad is None


def test_int8_llama_with_lora_trains_on_the_dequantised_path(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model = _lora(base)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        bnb_logits = model(input_ids=ids).logits
    assert kernels.dequantize_int8_linears(model) == 2 * 7
    assert kernels.dequantize_int8_linears(model) == 0
    ce = token_ce_sum(model(input_ids=ids).logits, ids)
    ce.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        fast_logits = model(input_ids=ids).logits
    assert (fast_logits - bnb_logits).abs().max() < 0.05  # both are the same int8 weights


# ---- Liger, checkpointing, compile ------------------------------------------------------------


def test_apply_liger_on_cpu_is_a_logged_no_op(caplog):
    with caplog.at_level(logging.INFO, logger="dialtune"):
        assert kernels.apply_liger(_tiny_llama()) is False
    assert "not applied" in caplog.text


def test_apply_liger_dispatches_per_model_type_on_the_unwrapped_model(monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(kernels, "_on_cuda", lambda m: True)
    base = _tiny_llama()
    assert kernels.apply_liger(_lora(base)) is True
    (kw,) = calls
    assert kw["model"] is base and kw["rms_norm"] and kw["swiglu"] and kw["rope"]
    assert not kw["cross_entropy"] and not kw["fused_linear_cross_entropy"]
    from transformers import GPT2Config, GPT2LMHeadModel

    assert kernels.apply_liger(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))) is False


def test_selective_checkpointing_keeps_every_kth_layer_and_the_gradients():
    model = _lora(_tiny_llama())
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="not enabled"):
        kernels.selective_checkpointing(model, 2)
    _, plain = _loss_and_grads(model, False, ids, input_ids=ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert kernels.selective_checkpointing(model, 2) == 1
    assert [layer.gradient_checkpointing for layer in kernels.decoder_layers(model)] == [True, False]
    _, ckpt = _loss_and_grads(model, False, ids, input_ids=ids)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_compile_decoder_layers_keeps_the_output():
    model = _lora(_tiny_llama()).eval()
    ids = torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert kernels.compile_decoder_layers(model, backend="eager") == 2
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_eval_under_compile_runs_eager():
    """kernels.eager(True), which the recipe's evaluation runs under with kernels.compile: eval
    batches of new lengths and generation compile nothing (outside it they would)."""
    from torch._dynamo.testing import CompileCounter

    model = _lora(_tiny_llama()).eval()
    counter = CompileCounter()
    torch._dynamo.reset()
    kernels.compile_decoder_layers(model, backend=counter)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 96, (2, 16), generator=gen))  # training-shaped batch: compiles
        compiled = counter.frame_count
        assert compiled > 0
        with kernels.eager(True):
            for n in (9, 23, 31):
                model(input_ids=torch.randint(1, 96, (3, n), generator=gen))
            model.generate(input_ids=torch.randint(1, 96, (1, 5), generator=gen), max_new_tokens=4, do_sample=False)
        assert counter.frame_count == compiled
        model(input_ids=torch.randint(1, 96, (3, 9), generator=gen))  # the control: a new shape compiles again
    assert counter.frame_count > compiled
    torch._dynamo.reset()


# ---- GPU (run by bench/gpu_session.sh on the lent machine) ------------------------------------


@pytest.mark.gpu
@cuda
def test_gpu_chunked_ce_bf16_llama3_vocab():
    torch.manual_seed(0)
    hidden = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(128256, 1024, device="cuda") * 0.02).bfloat16().requires_grad_(True)
    labels = _labels(2, 512, 128256, share=0.6).cuda()
    (ref, ref_h, ref_w), (got, got_h, got_w) = _both(hidden, weight, labels, chunk_size=256)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(got_h.float(), ref_h.float(), rtol=2e-2, atol=1e-3)
    # the weight gradient adds one bf16-rounded partial product per chunk: within a bf16 ulp of its largest entry
    torch.testing.assert_close(got_w.float(), ref_w.float(), rtol=0, atol=2**-7 * ref_w.float().abs().max().item())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("layout", ["sdpa", "varlen"])
def test_gpu_packed_fused_loss_equals_unpacked_unfused_loss(layout):
    """On the GPU's kernels too (SDPA with the mask; torch's FlashAttention varlen kernel),
    packed documents stay apart (bf16 tolerance)."""
    got, ref = _packed_and_padded_losses(torch.bfloat16, "cuda", layout)
    torch.testing.assert_close(got, ref, rtol=4e-3, atol=0.0)


@pytest.mark.gpu
@cuda
def test_gpu_int8_dequant_linear_matches_reference():
    """On CUDA (where quantized weights are moved, not re-quantized): within int8 error in bf16,
    and the LoRA-style input gradient flows."""
    ref, q = _int8_pair()
    q = q.cuda()
    fast = kernels.Int8DequantLinear(q)
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    want = ref.cuda()(x.detach())
    got = fast(x.bfloat16())
    bound = x.detach().abs().sum(-1, keepdim=True) * (fast.SCB / 254.0) + 0.02 * want.abs() + 0.02
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().le(bound).all()
    got.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


LIGER_CHECK = """
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from model import kernels
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).cuda().bfloat16()
model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
ids = torch.randint(1, 256, (2, 64), device="cuda")
ce = lambda: F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
want = ce().item()
assert kernels.apply_liger(model), "liger not applied"
got = ce()
got.backward()
assert abs(got.item() - want) <= 1e-2 * abs(want), (got.item(), want)
print("liger ok", want, got.item())
"""


@pytest.mark.gpu
@cuda
def test_gpu_apply_liger_keeps_the_loss():
    pytest.importorskip("liger_kernel")
    # a child process: Liger patches transformers' modeling modules for the rest of the process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", LIGER_CHECK], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "liger ok" in proc.stdout, proc.stdout + proc.stderr


def test_training_forwards_build_no_kv_cache():
    """train.recipe.model_inputs passes use_cache=False: a model whose config keeps use_cache
    (no gradient checkpointing) would otherwise fill a KV cache in every training forward."""
    from train.recipe import model_inputs

    model = _lora(_tiny_llama()).train()
    assert model.config.use_cache
    batch = {"input_ids": torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(8)),
             "labels": torch.full((2, 12), -100)}
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).past_key_values is not None  # the control
    inputs = model_inputs(batch, torch.device("cpu"))
    assert "labels" not in inputs and model(**inputs).past_key_values is None
