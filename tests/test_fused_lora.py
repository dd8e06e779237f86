"""kernels.fuse_lora: PEFT's LoRA branch as one autograd function that keeps the layer input once
and redraws the dropout mask in backward. Same function and gradients as PEFT's path; less memory."""
import pytest
import torch

from model import kernels, memory
from tests.test_kernels import _tiny_llama, cuda


def _lora(model, dropout, method="lora"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             use_dora=method == "dora", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _step(model, ids, seed=5):
    """Loss and adapter gradients of one forward/backward under a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


IDS = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def test_fused_lora_equals_peft_without_dropout_and_in_eval():
    model = _lora(_tiny_llama(), dropout=0.0)
    want_loss, want = _step(model, IDS)
    assert kernels.fuse_lora(model) == 2 * 7 and kernels.lora_fused(model)
    assert kernels.fuse_lora(model) == 2 * 7  # idempotent
    got_loss, got = _step(model, IDS)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(got) == set(want) and len(got) == 2 * 7 * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # with dropout, eval mode is the plain product, and the disabled adapter is the base
    drop = _lora(_tiny_llama(), dropout=0.3).eval()
    with torch.no_grad():
        want_logits = drop(input_ids=IDS).logits
        with drop.disable_adapter():
            base_logits = drop(input_ids=IDS).logits
        kernels.fuse_lora(drop)
        torch.testing.assert_close(drop(input_ids=IDS).logits, want_logits)
        with drop.disable_adapter():
            torch.testing.assert_close(drop(input_ids=IDS).logits, base_logits)
    assert not torch.allclose(want_logits, base_logits)


def test_fused_branch_with_dropout_is_the_gradient_of_its_forward(device="cpu", dtype=torch.float32):
    """The branch against autograd through an explicit dropout with the same mask, and the random
    state it leaves: one dropout's worth consumed by the forward, nothing by the backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).to(device, dtype).requires_grad_(True)
    a = torch.randn(4, 16, generator=g).to(device, dtype).requires_grad_(True)
    b = torch.randn(8, 4, generator=g).to(device, dtype).requires_grad_(True)
    w = torch.randn(3, 5, 8, generator=g).to(device, dtype)
    p, scaling = 0.25, 2.0
    gen = kernels._generator(x.device)
    torch.manual_seed(11)
    out = kernels.lora_branch(x, a, b, p, scaling)
    after_forward = gen.get_state()
    (out * w).sum().backward()
    assert torch.equal(gen.get_state(), after_forward)  # backward leaves the generator as it was
    torch.manual_seed(11)  # the mask the forward drew
    keep = torch.native_dropout(x.detach(), p, True)[1]
    assert torch.equal(gen.get_state(), after_forward)
    assert 0.6 < keep.float().mean() < 0.9  # ~1 - p of the inputs kept
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    ref = ((x2 * keep / (1 - p)) @ a2.t() @ b2.t()) * scaling  # inverted dropout
    (ref * w).sum().backward()
    for got, want in ((out, ref), (x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want)
        else:  # bf16: the reference scales by 1/(1 - p) at another point, so the roundings differ
            torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=2e-2 * want.float().abs().max().item())
    # the generator moved on: the next call draws another mask (q, k and v are not dropped alike)
    again = kernels.lora_branch(x, a, b, p, scaling)
    assert not torch.allclose(again, out)


def test_fused_lora_with_dropout_under_checkpointing_redraws_the_same_masks():
    """Activation checkpointing restores the RNG before recomputing a layer, so the recomputed
    forward draws the seeds of the first one: the gradients equal those without checkpointing."""
    plain = _lora(_tiny_llama(), dropout=0.2)
    ckpt = _lora(_tiny_llama(), dropout=0.2)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    for m in (plain, ckpt):
        kernels.fuse_lora(m)
        m.train()
    loss_a, grads_a = _step(plain, IDS, seed=7)
    loss_b, grads_b = _step(ckpt, IDS, seed=7)
    torch.testing.assert_close(loss_b, loss_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6, msg=n)
    # and dropout is on: another seed gives another loss
    assert not torch.allclose(_step(plain, IDS, seed=8)[0], loss_a)


def test_fused_lora_leaves_dora_to_peft():
    model = _lora(_tiny_llama(), dropout=0.0, method="dora")
    want_loss, want = _step(model, IDS)
    kernels.fuse_lora(model)
    got_loss, got = _step(model, IDS)
    torch.testing.assert_close(got_loss, want_loss)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd saves for backward in one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


def test_fused_lora_keeps_the_activations_memory_py_counts():
    """What one decoder layer saves with dropout shrinks to the dropout-0 figure, as the
    memory budget's estimate assumes when the LoRA layers are fused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=224, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    ids = torch.randint(1, 64, (1, 256), generator=torch.Generator().manual_seed(0))

    def per_layer(dropout, fused):
        totals = []
        for layers in (2, 3):  # the difference: one decoder layer
            cfg.num_hidden_layers = layers
            torch.manual_seed(0)
            m = _lora(LlamaForCausalLM(cfg), dropout).train()
            if fused:
                kernels.fuse_lora(m)
            totals.append(_saved_bytes(m, ids))
        return (totals[1] - totals[0]) / ids.numel()

    unfused, fused, no_dropout = per_layer(0.1, False), per_layer(0.1, True), per_layer(0.0, False)
    assert fused < 0.75 * unfused
    assert fused == pytest.approx(no_dropout, rel=0.02)
    # model/memory.py's table: fused LoRA counts as dropout 0; fp32 here, no Liger (its extra fp32 norms)
    est = memory.layer_activation_bytes(cfg, 1, lora_dropout=0.0, liger=False, dtype_bytes=4) / memory.MARGIN
    assert fused == pytest.approx(est, rel=0.15)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_branch_redraws_its_mask_on_cuda(dtype):
    test_fused_branch_with_dropout_is_the_gradient_of_its_forward("cuda", dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_fused_lora_equals_peft_in_bf16(dropout):
    """On a GPU nn.Dropout runs native_dropout, as the fused branch does, from the same generator
    at the same points: with dropout too, the same masks, loss and gradients as PEFT."""
    model = _lora(_tiny_llama(), dropout=dropout).cuda().bfloat16().train()
    ids = IDS.cuda()
    want_loss, want = _step(model, ids)
    kernels.fuse_lora(model)
    got_loss, got = _step(model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-2, atol=1e-2)
    for n in want:
        torch.testing.assert_close(got[n].float(), want[n].float(), rtol=5e-2, atol=2e-3 * want[n].float().abs().max().item(),
                                   msg=n)
