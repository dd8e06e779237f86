"""Varlen attention for packed rows (model/attention.py): every document's logits and gradients
are what it gets alone, on every supported architecture; sliding windows are honoured; a forward
that loses the cu_seqlens raises instead of leaking; evaluation runs on the model's own attention."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.chat import IGNORE
from data_pipeline.packing import collate_packed, cu_seqlens
from model import attention
from tests.test_peft import ARCHS

CPU = torch.device("cpu")


def _tiny(arch, **extra):
    import transformers

    torch.manual_seed(0)
    name, _ = ARCHS[arch]
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                         **{"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **extra})
    else:
        config = getattr(transformers, name)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             pad_token_id=0, **extra)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _docs(lengths=(7, 12, 5, 9, 20, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3:]})
    return docs


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _alone_logits(model, docs):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([d["input_ids"]])).logits[0] for d in docs]


def _packed_logits(model, rows, layout, **kw):
    batch = collate_packed(rows, 0, layout, **kw)
    with attention.packed_forward() if layout == "varlen" else torch.no_grad():
        logits = model(**_inputs(batch)).logits
    return batch, logits


def _split(logits, rows):
    out = []
    for r, row in enumerate(rows):
        at = 0
        for d in row:
            n = len(d["input_ids"])
            out.append(logits[r, at:at + n])
            at += n
    return out


def _ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")


def test_collate_varlen_segments_cover_documents_and_padding_tails():
    docs = _docs((7, 12, 5, 9, 20, 3))
    b = collate_packed([docs[:3], docs[3:]], 0, "varlen")  # rows of 24 and 32 tokens, padded to 32
    assert b["input_ids"].shape == (2, 32) and "attention_mask" not in b
    assert b["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 32, 41, 61, 64] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["cu_seq_lens_k"] is b["cu_seq_lens_q"] and b["max_length_q"] == b["max_length_k"] == 20
    cu, longest = cu_seqlens([3, 0, 4])  # empty segments (a full row's tail) vanish
    assert cu.tolist() == [0, 3, 7] and longest == 4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_varlen_packed_rows_equal_each_document_alone(arch):
    model = _tiny(arch)
    docs = _docs()
    rows = [docs[:3], docs[3:]]
    alone = _alone_logits(model, docs)
    assert attention.choose("varlen", model, CPU, torch.float32) == ("varlen", "causal SDPA per document")
    assert model.config._attn_implementation == attention.NAME
    _, logits = _packed_logits(model, rows, "varlen")
    for got, ref in zip(_split(logits.detach(), rows), alone):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("gpt2", False), ("llama", True)])
def test_varlen_gradients_equal_the_mask_path(arch, checkpointing):
    """Also with gradient checkpointing (the GPU recipes' setting): the recompute in backward,
    outside packed_forward(), replays the cu_seqlens."""
    model = _tiny(arch).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    docs = _docs()
    rows = [docs[:3], docs[3:]]
    attention.choose("varlen", model, CPU, torch.float32)
    grads = []
    for layout in ("varlen", "sdpa"):  # the same model: without cu_seqlens it is SDPA with the 4D mask
        model.zero_grad()
        batch = collate_packed(rows, 0, layout)
        with attention.packed_forward() if layout == "varlen" else torch.enable_grad():
            loss = _ce(model(**_inputs(batch)).logits, batch["labels"])
        loss.backward()  # outside packed_forward: a recompute without the cu_seqlens would leak
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lv, gv), (lm, gm) = grads
    assert lv == pytest.approx(lm, rel=1e-6)
    for n in gm:
        torch.testing.assert_close(gv[n], gm[n], atol=1e-6, rtol=1e-4, msg=n)


def test_sliding_window_is_honoured_by_both_packed_paths():
    """A 4-token window (documents up to 20 tokens): each document as transformers computes it alone."""
    model = _tiny("mistral", sliding_window=4)
    docs = _docs()
    rows = [docs[:3], docs[3:]]
    alone = _alone_logits(model, docs)
    window = attention.uniform_sliding_window(model.config, max_len=64)
    assert window == 4 and attention.uniform_sliding_window(model.config, max_len=4) is None
    _, masked = _packed_logits(model, rows, "sdpa", sliding_window=window)
    attention.choose("varlen", model, CPU, torch.float32)
    _, varlen = _packed_logits(model, rows, "varlen")
    for got_m, got_v, ref in zip(_split(masked, rows), _split(varlen.detach(), rows), alone):
        torch.testing.assert_close(got_m, ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got_v, ref, atol=2e-5, rtol=1e-5)
    _, unwindowed = _packed_logits(model, rows, "sdpa")
    assert (unwindowed[0, 7:19] - masked[0, 7:19]).abs().max() > 1e-3  # the window matters here


def test_packed_layout_gives_collate_what_the_chosen_path_needs():
    windowed = _tiny("mistral", sliding_window=4)
    assert attention.packed_layout("mask", windowed, CPU, torch.float32, 64) == ("mask", "kernels.packed_attention=mask", "sdpa", 4)
    assert attention.packed_layout("auto", windowed, CPU, torch.float32, 64) == ("varlen", "causal SDPA per document", "varlen", None)
    flash = _tiny("llama")
    flash.config._attn_implementation = "flash_attention_2"  # transformers' own kernels stay
    assert attention.packed_layout("auto", flash, CPU, torch.bfloat16, 64)[::2] == ("flash_attention_2", "flash_attention_2")


def test_flash_attention_2_gets_every_documents_cu_seqlens_with_several_rows():
    """transformers' flash path reads packing from position-id restarts only for a batch of one
    row; with two rows it would run causal attention over whole rows, across documents. So the
    flash_attention_2 layout carries the varlen path's cu_seqlens (proven boundary-safe above),
    which transformers' flash path uses as given over the flattened batch."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    docs = _docs()
    rows = [docs[:3], docs[3:]]
    flash = collate_packed(rows, 0, "flash_attention_2")
    varlen = collate_packed(rows, 0, "varlen")
    assert not _is_packed_sequence(flash["position_ids"], len(rows))  # position ids alone would leak
    assert set(flash) == set(varlen) >= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    for key in flash:
        assert torch.equal(torch.as_tensor(flash[key]), torch.as_tensor(varlen[key])), key
    lengths = [len(d["input_ids"]) for d in docs]
    cu = flash["cu_seq_lens_q"].tolist()
    L = flash["input_ids"].shape[1]
    # every document is a segment of its own, each row's padding tail another, over the flattened batch
    segments = [*lengths[:3], L - sum(lengths[:3]), *lengths[3:], L - sum(lengths[3:])]
    assert cu == [0, *itertools.accumulate(n for n in segments if n)]  # (the longer row has no padding tail)


def test_mixed_sliding_and_full_layers_cannot_use_one_mask():
    model = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(attention.PackedAttentionError, match="kernels.packed_attention=varlen"):
        attention.uniform_sliding_window(model.config, max_len=64)


def test_kwargs_the_varlen_path_cannot_honour_raise():
    q = torch.randn(1, 2, 6, 8)
    cu, longest = cu_seqlens([2, 4])
    module = torch.nn.Module()
    for extra in ({"s_aux": torch.zeros(2)}, {"is_causal": False}, {"softcap": 30.0}):
        with pytest.raises(RuntimeError, match="not supported by kernels.packed_attention=varlen"):
            attention.varlen_attention_forward(module, q, q, q, None, cu_seq_lens_q=cu, max_length_q=longest, **extra)


def test_a_packed_forward_without_cu_seqlens_raises_instead_of_leaking():
    model = _tiny("llama")
    attention.choose("varlen", model, CPU, torch.float32)
    batch = collate_packed([_docs()[:3]], 0, "varlen")
    with attention.packed_forward(), pytest.raises(RuntimeError, match="attend to each other"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def test_choose_auto_mask_and_refusals():
    model = _tiny("llama")
    assert attention.choose("mask", model, CPU, torch.bfloat16)[0] == "mask"
    assert model.config._attn_implementation == "sdpa"
    assert attention.choose("auto", model, torch.device("cuda"), torch.float32) == ("mask", "no varlen kernel for cuda float32")
    assert model.config._attn_implementation == "sdpa"
    assert attention.choose("auto", model, CPU, torch.float32) == ("varlen", "causal SDPA per document")
    assert model.config._attn_implementation == attention.NAME
    with pytest.raises(attention.PackedAttentionError, match="one of auto, varlen, mask"):
        attention.choose("flex", model, CPU, torch.float32)
    dropout = _tiny("llama", attention_dropout=0.1)
    with pytest.raises(attention.PackedAttentionError, match=r"attention_dropout is 0.1 \(the varlen kernel has no attention dropout\); use kernels.packed_attention=mask"):
        attention.choose("varlen", dropout, CPU, torch.float32)
    assert attention.choose("auto", dropout, torch.device("cuda"), torch.bfloat16)[0] == "mask"
    gpt2 = _tiny("gpt2", attn_pdrop=0.1)  # GPT-2's default
    assert attention.choose("auto", gpt2, torch.device("cuda"), torch.bfloat16)[1] == \
        "varlen unsupported: attn_pdrop is 0.1 (the varlen kernel has no attention dropout)"
    with pytest.raises(attention.PackedAttentionError, match="attn_pdrop"):
        attention.choose("varlen", gpt2, CPU, torch.float32)
    hybrid = _tiny("llama")
    hybrid.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(attention.PackedAttentionError, match="linear_attention layers"):
        attention.choose("varlen", hybrid, CPU, torch.float32)
    with pytest.raises(attention.PackedAttentionError, match="data.packing=true cannot keep .* linear_attention layers"):
        attention.packed_layout("mask", hybrid, CPU, torch.float32, 64)  # no packed layout at all
    assert attention.non_attention_layers(_tiny("qwen2").config) is None
    sinks = _tiny("llama")
    sinks.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    assert "attention sinks" in attention.choose("auto", sinks, CPU, torch.float32)[1]
    stuck = _tiny("llama")
    stuck.set_attn_implementation = lambda name: None  # a model (or transformers version) that cannot switch
    with pytest.raises(attention.PackedAttentionError, match="cannot switch to it .*packed_attention=mask"):
        attention.choose("varlen", stuck, CPU, torch.float32)


def test_kernel_call_follows_the_torch_signature():
    """varlen_attn's keywords changed across torch versions: the call is built from the signature,
    and what a version cannot express falls back to per-document SDPA (None)."""
    new = frozenset({"scale", "window_size", "enable_gqa"})
    assert attention._kernel_call(new, 8, 2, 64, 0.125, None) == ({"window_size": (-1, 0), "scale": 0.125, "enable_gqa": True}, False)
    assert attention._kernel_call(new, 8, 8, 64, 0.125, 16) == ({"window_size": (15, 0), "scale": 0.125}, False)
    older = frozenset({"scale", "window_size"})
    assert attention._kernel_call(older, 8, 2, 64, 0.125, None) == ({"window_size": (-1, 0), "scale": 0.125}, True)
    oldest = frozenset({"is_causal"})
    assert attention._kernel_call(oldest, 4, 4, 64, 0.125, None) == ({"is_causal": True}, False)
    assert attention._kernel_call(oldest, 4, 4, 64, 0.125, 16) is None  # no window
    assert attention._kernel_call(oldest, 4, 4, 64, 0.1, None) is None  # no scale
    assert attention._kernel_call(frozenset(), 4, 4, 64, 0.125, None) is None


def test_standard_restores_the_implementation_the_model_had():
    """Evaluation and generation run on the model's own implementation (here eager, which a
    hard-coded sdpa would not give back), through the PEFT wrapper; unpacked calls outside
    standard() are plain SDPA with transformers' masks."""
    from peft import LoraConfig, get_peft_model

    eager = _tiny("llama")
    eager.set_attn_implementation("eager")
    model = get_peft_model(eager, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        attention.choose("varlen", model, CPU, torch.float32)
        base = model.get_base_model()
        assert base.config._attn_implementation == attention.NAME
        torch.testing.assert_close(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)
        with attention.standard(model):
            assert base.config._attn_implementation == "eager"
            torch.testing.assert_close(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)
        assert base.config._attn_implementation == attention.NAME


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's FlashAttention varlen kernel)")
@pytest.mark.parametrize("window", [None, 16])
def test_gpu_varlen_kernel_matches_per_document_sdpa(window):
    """The CUDA kernel (bf16, GQA 8:2, causal window) against causal SDPA per document in fp32:
    outputs and input gradients within bf16 tolerance."""
    dev = torch.device("cuda")
    assert attention.kernel_available(dev, torch.bfloat16)
    lengths = [37, 300, 5, 128, 1, 553]
    cu, longest = cu_seqlens(lengths)
    cu = cu.to(dev)
    T = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 8, T, 64, device=dev, generator=g)
    k, v = (torch.randn(1, 2, T, 64, device=dev, generator=g) for _ in range(2))
    grad_out = torch.randn(1, T, 8, 64, device=dev, generator=g)

    class Module(torch.nn.Module):
        pass

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = attention.varlen_attention_forward(Module(), *leaves, None, scaling=64 ** -0.5, sliding_window=window,
                                                    cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                                                    max_length_k=longest)
        out.backward(grad_out.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    got = run(torch.bfloat16)  # the kernel
    ref = run(torch.float32)  # per-document SDPA
    for a, b, name in zip(got, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2, msg=name)


def _compiled_frames(model, batches, warm_after, **collate_kw):
    """(dynamo frames after the first warm_after batches, frames after all, each batch's logits)
    through freshly compiled decoder layers; every collated batch is checked by collate_kw's pad_to."""
    from torch._dynamo.testing import CompileCounter

    from model.kernels import compile_decoder_layers

    counter = CompileCounter()
    torch._dynamo.reset()
    compile_decoder_layers(model, backend=counter)
    out, warm = [], None
    for i, rows in enumerate(batches):
        with torch.no_grad():
            batch, logits = _packed_logits(model, rows, "varlen", **collate_kw)
        assert collate_kw.get("pad_to") is None or batch["input_ids"].shape[1] == collate_kw["pad_to"]
        out.append(logits)
        if i + 1 == warm_after:
            warm = counter.frame_count
    torch._dynamo.reset()
    return warm, counter.frame_count, out


def test_compiled_layers_do_not_recompile_per_segment_layout():
    """kernels.compile traces each decoder layer; varlen attention stays out of the trace, so
    batches of the same row length but new document layouts (other counts, max lengths) reuse
    the compiled layers instead of recompiling each time (and hitting dynamo's limit), with the
    eager logits."""
    model = _tiny("llama")
    attention.choose("varlen", model, CPU, torch.float32)
    layouts = [((7, 12, 13), (8, 20, 4)), ((16, 16), (4, 28)), ((30, 2), (1, 31)), ((3, 3, 26), (10, 10, 12)),
               ((32,), (32,)), ((9, 9, 14), (1, 31))]  # rows of 32 tokens, 2-6 segments, longest 20-32
    batches = [[_docs(a, seed=i), _docs(b, seed=10 + i)] for i, (a, b) in enumerate(layouts)]
    eager = [_packed_logits(model, rows, "varlen")[1] for rows in batches]
    warm, end, compiled = _compiled_frames(model, batches, warm_after=3)
    assert end == warm, f"recompiled for new segment layouts: {warm} -> {end} frames"
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compile_pads_packed_rows_to_one_shape():
    """Under kernels.compile every packed row is padded to the pack capacity (pad_to), so batches
    whose longest row differs reuse one graph; without it each new row length recompiles (the
    control). The documents' logits are what they are unpadded."""
    model = _tiny("llama")
    attention.choose("varlen", model, CPU, torch.float32)
    layouts = [((7, 12), (8, 4)), ((16, 16, 8), (4, 28)), ((30, 2, 9, 3), (1, 31)), ((3, 3), (10, 10, 12, 14)),
               ((20,), (21, 27))]  # longest rows of 19 to 48 tokens
    batches = [[_docs(a, seed=i), _docs(b, seed=10 + i)] for i, (a, b) in enumerate(layouts)]
    warm, end, padded = _compiled_frames(model, batches, warm_after=2, pad_to=48)
    assert end == warm, f"recompiled for new row lengths: {warm} -> {end} frames"
    warm, end, unpadded = _compiled_frames(model, batches, warm_after=2)
    assert end > warm  # the control: row lengths that vary do recompile
    for rows, a, b in zip(batches, padded, unpadded):
        for x, y in zip(_split(a, rows), _split(b, rows)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_gemma2_is_told_plainly_what_it_cannot_do(tmp_path):
    """Gemma-2 mixes sliding-window and full layers (one packed mask cannot say that) and softcaps its
    attention logits (the varlen path cannot): packing is refused with what to do, where each path
    sent the user to the other; and its missing SDPA support is one sentence, not transformers'
    ValueError traceback (arch probe)."""
    from omegaconf import OmegaConf
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from model import attention, loader
    from train.config import ConfigError, DialtuneConfig

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, sliding_window=16, attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    for mode in ("auto", "mask", "varlen"):
        with pytest.raises(attention.PackedAttentionError, match=r"^data.packing=true cannot keep conversations apart in this "
                           r"model: .* and the varlen path cannot run \(its attention logits are softcapped\); set data.packing=false"):
            attention.packed_layout(mode, model, torch.device("cpu"), torch.float32, 128)
    model.save_pretrained(tmp_path / "g2")
    cfg = OmegaConf.structured(DialtuneConfig)
    cfg.model.name_or_path, cfg.model.dtype = str(tmp_path / "g2"), "fp32"
    with pytest.raises(ConfigError, match=r"^Gemma2ForCausalLM has no model.attn_implementation=sdpa in this transformers; set "
                                          r"model.attn_implementation=eager.$"):
        loader.load_base(cfg, str(tmp_path / "g2"), torch.device("cpu"))
