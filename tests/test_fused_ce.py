"""model/kernels.py's chunked linear + cross-entropy: equals logits + CE (values and gradients),
also through a PEFT model and on packed rows (both packed attention paths), and says why a model
cannot use it."""
import pytest
import torch

from data_pipeline.batching import collate, target_tokens
from data_pipeline.packing import collate_packed
from model import kernels
from tests.model_helpers import cuda, loss_and_grads, tiny_llama, with_lora

IGNORE = -100


def _labels(B, T, V, share=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > share] = IGNORE
    return labels


def _reference(hidden, weight, labels):
    return kernels.token_ce_sum(hidden @ weight.t(), labels)


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


@pytest.mark.parametrize("kind", ["lora", "lora_tied_head_trained", "plain_full_finetune"])
def test_fused_ce_equals_logits_path(kind):
    """Loss and every trainable gradient: PeftModel(Llama) with a frozen head, with a tied head in
    modules_to_save (the weight gets its gradient), and a plain Llama with everything trainable."""
    save_head = kind == "lora_tied_head_trained"
    if kind == "plain_full_finetune":
        model = tiny_llama()
    else:
        model = with_lora(tiny_llama(tie=save_head), modules_to_save=["lm_head"] if save_head else None)
    assert kernels.fused_ce_unsupported(model) is None
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = torch.where(torch.arange(24) >= 10, ids, IGNORE)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels[1, 20:] = IGNORE
    ref, ref_g = loss_and_grads(model, False, labels, input_ids=ids, attention_mask=mask)
    got, got_g = loss_and_grads(model, True, labels, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert got_g.keys() == ref_g.keys() and any("lm_head" in n for n in got_g) == (kind != "lora")
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
    assert model(input_ids=ids).logits.shape[-1] == 96  # the head's forward is back


def test_fused_ce_refuses_a_head_with_an_adapter():
    """LoRA on lm_head: the head's .weight is the base weight alone, so the fused loss would drop
    the adapter's term and its gradient; the recipe computes full logits instead (and says why)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert "adapter" in kernels.fused_ce_unsupported(model)
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.where(torch.arange(16) >= 4, ids, IGNORE)
    ref, ref_g = loss_and_grads(model, False, labels, input_ids=ids)
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

    model = with_lora(tiny_llama()).to(device=device, dtype=dtype)
    docs = _conversations()
    with torch.no_grad():
        padded = {k: v.to(device) for k, v in collate(docs, pad_id=0).items()}
        ref = kernels.token_ce_sum(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
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
    model = tiny_llama()
    head = model.get_output_embeddings()
    hook = head.forward  # what accelerate's hooks leave on the instance
    head.forward = hook
    ids = torch.randint(1, 96, (1, 5))
    with kernels.hidden_states_as_logits(model) as weight:
        assert weight is head.weight and model(input_ids=ids).logits.shape[-1] == 32
    assert head.__dict__["forward"] is hook and model(input_ids=ids).logits.shape[-1] == 96


def test_fused_ce_unsupported_names_the_reason():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in kernels.fused_ce_unsupported(model)


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
