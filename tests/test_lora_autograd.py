"""model/lora_autograd.py: the fused LoRA branch and the fused SwiGLU are the gradients of their
forwards (against autograd through explicit ops with the same dropout mask), draw one mask's worth
of random state in forward and none in backward; the norm tag is void after an in-place change."""
import pytest
import torch

from model import lora_autograd
from tests.model_helpers import cuda


def test_fused_branch_with_dropout_is_the_gradient_of_its_forward(device="cpu", dtype=torch.float32):
    """The branch (added to the base projection's output in one GEMM) against autograd through an
    explicit dropout with the same mask, and the random state it leaves: one dropout's worth
    consumed by the forward, nothing by the backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).to(device, dtype).requires_grad_(True)
    base = torch.randn(3, 5, 8, generator=g).to(device, dtype).requires_grad_(True)
    a = torch.randn(4, 16, generator=g).to(device, dtype).requires_grad_(True)
    b = torch.randn(8, 4, generator=g).to(device, dtype).requires_grad_(True)
    w = torch.randn(3, 5, 8, generator=g).to(device, dtype)
    p, scaling = 0.25, 2.0
    gen = lora_autograd.dropout_generator(x.device)
    torch.manual_seed(11)
    out = lora_autograd.lora_branch(base, x, a, b, p, scaling)
    after_forward = gen.get_state()
    torch.rand(7, device=device)  # something else draws before the backward
    before_backward = gen.get_state()
    (out * w).sum().backward()
    assert torch.equal(gen.get_state(), before_backward)  # backward leaves the generator as it found it
    torch.manual_seed(11)  # the mask the forward drew
    keep = torch.native_dropout(x.detach(), p, True)[1]
    assert torch.equal(gen.get_state(), after_forward)  # the forward drew one dropout's worth
    assert 0.6 < keep.float().mean() < 0.9  # ~1 - p of the inputs kept
    x2, a2, b2, base2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b, base))
    ref = base2 + ((x2 * keep / (1 - p)) @ a2.t() @ b2.t()) * scaling  # inverted dropout
    (ref * w).sum().backward()
    for got, want in ((out, ref), (x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad), (base.grad, base2.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want)
        else:  # bf16: the reference scales by 1/(1 - p) at another point, so the roundings differ
            torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=2e-2 * want.float().abs().max().item())
    # the generator moved on: the next call draws another mask (q, k and v are not dropped alike)
    again = lora_autograd.lora_branch(base, x, a, b, p, scaling)
    assert not torch.allclose(again, out)


def test_fused_swiglu_is_the_gradient_of_its_forward(device="cpu", dtype=torch.float32, liger=False):
    """h = silu(gate) * up and down_proj's LoRA branch on dropout(h), against autograd through the
    explicit ops with the same mask: both outputs and the gradients of gate, up, A and B (h's own
    gradient, from the base projection, joins the branch's before the SwiGLU's backward)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 24, generator=g).to(device, dtype).requires_grad_(True) for _ in range(2))
    a = torch.randn(4, 24, generator=g).to(device, dtype).requires_grad_(True)
    b = torch.randn(8, 4, generator=g).to(device, dtype).requires_grad_(True)
    w_h, w_out = torch.randn(3, 5, 24, generator=g).to(device, dtype), torch.randn(3, 5, 8, generator=g).to(device, dtype)
    p, scaling = 0.25, 2.0
    gen = lora_autograd.dropout_generator(gate.device)
    torch.manual_seed(11)
    base = torch.randn(3, 5, 8, generator=g).to(device, dtype)
    # through copies, as in a model (gate and up are projections' outputs): Liger's backward writes
    # the gradients into the storage of the tensors it was given
    h, r = lora_autograd.SwiGLULora.apply(gate.clone(), up.clone(), a, p, liger)
    out = lora_autograd.add_lora(base, r, b, scaling)
    after_forward = gen.get_state()
    ((h * w_h).sum() + (out * w_out).sum()).backward()
    assert torch.equal(gen.get_state(), after_forward)
    gate2, up2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (gate, up, a, b))
    h2 = F.silu(gate2) * up2
    torch.manual_seed(11)
    keep = torch.native_dropout(h2.detach(), p, True)[1]
    out2 = base + ((h2 * keep / (1 - p)) @ a2.t() @ b2.t()) * scaling
    ((h2 * w_h).sum() + (out2 * w_out).sum()).backward()
    for got, want in ((h, h2), (out, out2), (gate.grad, gate2.grad), (up.grad, up2.grad), (a.grad, a2.grad),
                      (b.grad, b2.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # bf16: dropout's scale, the LoRA product and the sums are rounded at other points
            torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=2e-2 * want.float().abs().max().item())


def test_an_in_place_change_voids_the_norm_tag():
    """The branch recomputes its input from the norm's input only while the norm's output is as the
    norm wrote it; after an in-place change it keeps the tensor itself (the right gradient)."""
    norm = torch.nn.LayerNorm(16)
    norm.register_forward_hook(lora_autograd.mark_normed)
    inp = torch.randn(2, 3, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    x = norm(inp)
    assert lora_autograd.norm_of(x)[0] is norm
    x.mul_(3)
    assert lora_autograd.norm_of(x) == ()
    out = lora_autograd.lora_branch(torch.zeros(2, 3, 8), x, a, b, 0.0, 2.0)
    out.sum().backward()
    a2 = a.detach().clone().requires_grad_(True)
    ((x.detach() @ a2.t() @ b.detach().t()) * 2.0).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)


# ---- GPU (run by bench/gpu_session.sh on the lent machine) ------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_branch_redraws_its_mask_on_cuda(dtype):
    test_fused_branch_with_dropout_is_the_gradient_of_its_forward("cuda", dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,liger", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_gpu_fused_swiglu_is_the_gradient_of_its_forward(dtype, liger):
    if liger:
        pytest.importorskip("liger_kernel")
    test_fused_swiglu_is_the_gradient_of_its_forward("cuda", dtype, liger)
