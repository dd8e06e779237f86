"""model/kernels.py: the dequantising int8 linear matches its bf16 source within int8 error and
trains LoRA; Liger, selective checkpointing and regional compile plumbing (the chunked linear + CE:
tests/test_fused_ce.py)."""
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from model import kernels
from tests.conftest import ROOT
from tests.model_helpers import cuda, loss_and_grads, tiny_llama, with_lora


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

    tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model = with_lora(base)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        bnb_logits = model(input_ids=ids).logits
    assert kernels.dequantize_int8_linears(model) == 2 * 7
    assert kernels.dequantize_int8_linears(model) == 0
    ce = kernels.token_ce_sum(model(input_ids=ids).logits, ids)
    ce.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        fast_logits = model(input_ids=ids).logits
    assert (fast_logits - bnb_logits).abs().max() < 0.05  # both are the same int8 weights


# ---- Liger, checkpointing, compile ------------------------------------------------------------


def test_apply_liger_on_cpu_is_a_logged_no_op(caplog):
    with caplog.at_level(logging.INFO, logger="dialtune"):
        assert kernels.apply_liger(tiny_llama()) is False
    assert "not applied" in caplog.text


def test_apply_liger_dispatches_per_model_type_on_the_unwrapped_model(monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(kernels, "_on_cuda", lambda m: True)
    base = tiny_llama()
    assert kernels.apply_liger(with_lora(base)) is True
    (kw,) = calls
    assert kw["model"] is base and kw["rms_norm"] and kw["swiglu"] and kw["rope"]
    assert not kw["cross_entropy"] and not kw["fused_linear_cross_entropy"]
    from transformers import GPT2Config, GPT2LMHeadModel

    assert kernels.apply_liger(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))) is False


def test_selective_checkpointing_keeps_every_kth_layer_and_the_gradients():
    model = with_lora(tiny_llama())
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="not enabled"):
        kernels.selective_checkpointing(model, 2)
    _, plain = loss_and_grads(model, False, ids, input_ids=ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert kernels.selective_checkpointing(model, 2) == 1
    assert [layer.gradient_checkpointing for layer in kernels.decoder_layers(model)] == [True, False]
    _, ckpt = loss_and_grads(model, False, ids, input_ids=ids)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_compile_decoder_layers_keeps_the_output():
    model = with_lora(tiny_llama()).eval()
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

    model = with_lora(tiny_llama()).eval()
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
    """data_pipeline.batching.model_inputs passes use_cache=False: a model whose config keeps use_cache
    (no gradient checkpointing) would otherwise fill a KV cache in every training forward."""
    from data_pipeline.batching import model_inputs

    model = with_lora(tiny_llama()).train()
    assert model.config.use_cache
    batch = {"input_ids": torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(8)),
             "labels": torch.full((2, 12), -100)}
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).past_key_values is not None  # the control
    inputs = model_inputs(batch, torch.device("cpu"))
    assert "labels" not in inputs and model(**inputs).past_key_values is None
