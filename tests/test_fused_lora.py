"""model/fused_lora.py (kernels.fused_lora) in PEFT models: the same loss, gradients, masks and
random state as PEFT's modules (with dropout, under checkpointing, on a GPU in bf16 and with Liger),
PEFT's own forward where the fused one does not apply, and exactly the saved bytes model/memory.py
counts. The autograd functions alone: tests/test_lora_autograd.py."""
import pytest
import torch

from model import fused_lora, memory
from tests.model_helpers import cuda, tiny_llama


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
    model = _lora(tiny_llama(), dropout=0.0)
    want_loss, want = _step(model, IDS)
    assert fused_lora.fuse_lora(model) == 2 * 7 and fused_lora.fused_parts(model) == {"lora", "norms", "swiglu"}
    assert fused_lora.fuse_lora(model) == 2 * 7  # idempotent
    got_loss, got = _step(model, IDS)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(got) == set(want) and len(got) == 2 * 7 * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # with dropout, eval mode is the plain product, and the disabled adapter is the base
    drop = _lora(tiny_llama(), dropout=0.3).eval()
    with torch.no_grad():
        want_logits = drop(input_ids=IDS).logits
        with drop.disable_adapter():
            base_logits = drop(input_ids=IDS).logits
        fused_lora.fuse_lora(drop)
        torch.testing.assert_close(drop(input_ids=IDS).logits, want_logits)
        with drop.disable_adapter():
            torch.testing.assert_close(drop(input_ids=IDS).logits, base_logits)
    assert not torch.allclose(want_logits, base_logits)


class LigerSwiGLUMLP:  # stands in for liger_kernel's class: fuse_lora knows Liger's forward by its module and name
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


LigerSwiGLUMLP.forward.__module__ = "liger_kernel.transformers.swiglu"


def test_fuse_lora_replaces_a_swiglu_forward_bound_to_the_instance():
    """Liger binds its SwiGLU forward (and name) to each MLP instance; the fused SwiGLU must run
    instead (same function), else down_proj's input would be kept after all. Another forward bound
    there (someone else's wrapper) is left alone, and that MLP not counted as fused."""
    model = _lora(tiny_llama(), dropout=0.0)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]
    for mlp in mlps:
        mlp.__dict__["forward"] = LigerSwiGLUMLP.forward.__get__(mlp)
        mlp.__dict__["_get_name"] = (lambda self: "LigerSwiGLUMLP").__get__(mlp)
    other = lambda x: mlps[1].down_proj(mlps[1].act_fn(mlps[1].gate_proj(x)) * mlps[1].up_proj(x))  # noqa: E731
    mlps[1].__dict__["forward"] = other
    fused_lora.fuse_lora(model, liger=True)  # on the CPU: torch's SwiGLU ops all the same
    assert "forward" not in mlps[0].__dict__ and type(mlps[0]).__name__ == "FusedLlamaMLP" and mlps[0]._dialtune_liger
    assert mlps[1].__dict__["forward"] is other and type(mlps[1]).__name__ == "LlamaMLP"
    assert fused_lora.fused_parts(model) == {"lora", "norms"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want)


def test_fused_model_pickles_for_another_process(tmp_path):
    """torch.save of a whole fused model loads in a fresh process (the Fused<name> classes exist only
    once fuse_lora made them: they pickle as base class + mixin), with the same logits."""
    import subprocess
    import sys
    from pathlib import Path

    model = _lora(tiny_llama(), dropout=0.0).eval()
    fused_lora.fuse_lora(model)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    torch.save({"model": model, "ids": IDS, "logits": want}, tmp_path / "m.pt")
    code = ("import torch, sys; d = torch.load(sys.argv[1], weights_only=False); m = d['model']\n"
            "from model import fused_lora\n"
            "assert type(m.base_model.model.model.layers[0].mlp).__name__ == 'FusedLlamaMLP'\n"
            "assert fused_lora.fused_parts(m) == {'lora', 'norms', 'swiglu'}\n"
            "with torch.no_grad(): torch.testing.assert_close(m(input_ids=d['ids']).logits, d['logits'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], cwd=str(Path(__file__).parent.parent),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fused_mlp_hands_a_hooked_down_proj_its_own_call():
    """PEFT's adapter_names (a batch mixing adapters, at inference) reaches each LoRA layer through
    a forward pre-hook: the fused MLP must call down_proj itself then."""
    model = _lora(tiny_llama(), dropout=0.0).eval()
    with torch.no_grad():
        want = model(input_ids=IDS, adapter_names=["default", "__base__"]).logits
        fused_lora.fuse_lora(model)
        got = model(input_ids=IDS, adapter_names=["default", "__base__"]).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[1], base[1])
    # a global hook (a profiler's, a FLOP counter's) sees the MLP's call and leaves the fused SwiGLU on
    model.train()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        loss = model(input_ids=IDS, labels=IDS).loss
    finally:
        handle.remove()
    assert "SwiGLULoraBackward" in _graph_nodes(loss) and "swiglu" in fused_lora.fused_parts(model)


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_with_dropout_equals_peft_masks_included(checkpointing):
    """With dropout, the fused branch draws PEFT's masks (torch's dropout from the same generator at
    the same points; activation checkpointing restores the state before recomputing a layer): the
    same loss, gradients and random state after the step as PEFT's modules."""
    def model():
        m = _lora(tiny_llama(), dropout=0.2)
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        return m.train()

    peft_model, fused = model(), model()
    assert fused_lora.fuse_lora(fused) == 2 * 7 and fused_lora.fused_parts(fused) == {"lora", "norms", "swiglu"}
    want_loss, want = _step(peft_model, IDS, seed=7)
    want_state = torch.get_rng_state()
    got_loss, got = _step(fused, IDS, seed=7)
    assert torch.equal(torch.get_rng_state(), want_state)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # dropout is on: another seed gives another loss
    assert not torch.allclose(_step(fused, IDS, seed=8)[0], got_loss)


def test_fused_lora_hands_other_cases_to_peft():
    """Merged adapters, several active adapters, autocast and a LoRA bias run PEFT's own forward."""
    import io

    from peft import LoraConfig, get_peft_model

    model = _lora(tiny_llama(), dropout=0.0).eval()
    fused_lora.fuse_lora(model)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        model.merge_adapter()  # the delta is in the base weights now: not added a second time
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # no crash, PEFT's result
            auto = model(input_ids=IDS).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()  # fp32 adapter, bf16 autocast forward, backward outside it (as usual): runs
    assert (auto.float() - want).abs().max() < 0.1
    # two adapters active at once
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])
    fused_two = fused_lora.fuse_lora(model)
    with torch.no_grad():
        two = model(input_ids=IDS).logits
    assert fused_two == 2 * 7 and torch.isfinite(two).all()
    buf = io.BytesIO()
    torch.save(model, buf)  # the fused classes pickle (whole-module saves)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, two)
    # a LoRA bias is not the plain branch: those layers stay PEFT's
    biased = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True))
    assert fused_lora.fuse_lora(biased) == 0 and not fused_lora.lora_fused(biased)
    # some layers fused, others PEFT's: not counted as fused (the memory budget keeps their dropped copies)
    mixed = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.1))
    mixed.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias = torch.nn.Parameter(torch.zeros(32))
    assert fused_lora.fuse_lora(mixed) == 2 * 2 - 1 and not fused_lora.lora_fused(mixed)


def test_fused_lora_leaves_dora_to_peft():
    model = _lora(tiny_llama(), dropout=0.0, method="dora")
    want_loss, want = _step(model, IDS)
    assert fused_lora.fuse_lora(model) == 0  # nothing fused, nothing reported fused
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
    """What one decoder layer saves with dropout shrinks below the dropout-0 figure, by exactly what
    the fusion drops: the LoRA inputs are kept once whatever the dropout, the two norms' outputs
    (q/k/v's and gate/up's input) not at all, nor down_proj's input or the SiLU output (two
    intermediate-size tensors); memory.py's table says the same."""
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
                fused_lora.fuse_lora(m)
                assert fused_lora.fused_parts(m) == {"lora", "norms", "swiglu"}
            totals.append(_saved_bytes(m, ids))
        return (totals[1] - totals[0]) / ids.numel()

    unfused, fused, no_dropout = per_layer(0.1, False), per_layer(0.1, True), per_layer(0.0, False)
    assert fused < 0.55 * unfused
    # fp32: h = silu(gate) * up, silu(gate), and the two norms' outputs
    assert no_dropout - fused == (2 * cfg.intermediate_size + 2 * cfg.hidden_size) * 4
    # model/memory.py's table (fp32 here, no Liger)
    est = dict(liger=False, dtype_bytes=4)
    fused_est = memory.layer_activation_bytes(cfg, 1, lora_dropout=0.1, fused=fused_lora.ALL_PARTS, **est) / memory.MARGIN
    no_dropout_est = memory.layer_activation_bytes(cfg, 1, lora_dropout=0.0, **est) / memory.MARGIN
    assert no_dropout_est - fused_est == pytest.approx(no_dropout - fused, abs=1)
    assert fused == pytest.approx(fused_est, rel=0.2)


def test_lora_on_q_and_v_only_recomputes_the_norm_output_too():
    """k_proj without an adapter keeps nothing of its input: LoRA on q and v alone still keeps the
    norm's input instead of its output (one hidden-size tensor less per layer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=224, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    ids = torch.randint(1, 64, (1, 256), generator=torch.Generator().manual_seed(0))

    def per_layer(fused):
        totals = []
        for layers in (2, 3):
            cfg.num_hidden_layers = layers
            torch.manual_seed(0)
            m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).train()
            if fused:
                fused_lora.fuse_lora(m)
            totals.append(_saved_bytes(m, ids))
        return (totals[1] - totals[0]) / ids.numel()

    assert per_layer(False) - per_layer(True) == cfg.hidden_size * 4  # fp32


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_fused_lora_equals_peft_in_bf16(dropout):
    """On a GPU nn.Dropout runs native_dropout, as the fused branch does, from the same generator
    at the same points: with dropout too, the same masks, loss and gradients as PEFT."""
    model = _lora(tiny_llama(), dropout=dropout).cuda().bfloat16().train()
    ids = IDS.cuda()
    want_loss, want = _step(model, ids)
    fused_lora.fuse_lora(model)
    got_loss, got = _step(model, ids)
    _close_in_bf16(got_loss, want_loss, got, want)
    if dropout == 0:  # about as close to the fp32 result as PEFT's bf16 path (one rounding where PEFT has three)
        ref = _lora(tiny_llama(), dropout=0.0).cuda().train()
        ref_loss, ref_grads = _step(ref, ids)
        for n in want:
            err = lambda g: ((g[n].float() - ref_grads[n]).norm() / ref_grads[n].norm()).item()  # noqa: E731
            assert err(got) <= 2 * err(want) + 2e-3, n


def _close_in_bf16(got_loss, want_loss, got, want):
    """Two bf16 paths of the same function: the loss to 1e-2, each gradient norm-wise to 5e-2
    (elementwise, bf16's 8 bits leave single entries far apart)."""
    torch.testing.assert_close(got_loss.float(), want_loss.float(), rtol=1e-2, atol=1e-2)
    assert set(got) == set(want)
    for n in want:
        rel = ((got[n].float() - want[n].float()).norm() / want[n].float().norm()).item()
        assert rel < 5e-2, (n, rel)


@pytest.mark.gpu
@cuda
def test_gpu_fused_lora_with_liger_equals_peft_with_liger():
    """With Liger's kernels (the GPU recipes' default) the fused SwiGLU runs Liger's SwiGLU kernels:
    the same loss and gradients as Liger's MLP with PEFT's modules."""
    pytest.importorskip("liger_kernel")
    from model import kernels

    model = _lora(tiny_llama(), dropout=0.1).cuda().bfloat16().train()
    assert kernels.apply_liger(model)
    ids = IDS.cuda()
    want_loss, want = _step(model, ids)
    fused_lora.fuse_lora(model, liger=True)
    assert "swiglu" in fused_lora.fused_parts(model)
    got_loss, got = _step(model, ids)
    _close_in_bf16(got_loss, want_loss, got, want)
