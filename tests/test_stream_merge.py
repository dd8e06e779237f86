"""Tensor-by-tensor merge (model/stream_merge.py): the same weights as PEFT's merge_and_unload for
LoRA, rsLoRA, DoRA, trained embeddings (added tokens) and GPT-2's transposed Conv1D layers; the
same logits as base + adapter; bounded memory on a model much larger than one shard. Also GPT-2's
Conv1D layout through the dequantized round trip (export.base=dequantized)."""
import json
import subprocess
import sys

import pytest
import torch

from model.stream_merge import MergeError, merge_to_dir
from tests.conftest import ROOT, run_env


def _tiny(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=48, n_layer=2, n_head=4, n_positions=64))
    shape = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=kind == "tied")
    return Qwen2ForCausalLM(Qwen2Config(**shape)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape))


def _adapter(model, method, modules_to_save=None, grow=0):
    from peft import LoraConfig, get_peft_model

    if grow:
        model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + grow)
    targets = ["c_attn", "c_proj", "c_fc"] if model.config.model_type == "gpt2" else "all-linear"
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                            use_dora=method == "dora", use_rslora=method == "rslora",
                                            modules_to_save=modules_to_save, fan_in_fan_out=model.config.model_type == "gpt2",
                                            bias="all" if model.config.model_type == "qwen2" else "none"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name or "modules_to_save" in name or name.endswith("bias") and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # B is non-zero, magnitudes and embeddings move
    return peft.eval()


@pytest.mark.parametrize("kind,method,save", [("llama", "lora", None), ("llama", "rslora", None), ("llama", "dora", None),
                                              ("llama", "lora", ["embed_tokens", "lm_head"]), ("gpt2", "lora", None),
                                              ("gpt2", "dora", None),
                                              # (arch probe) a tied base whose embedding or head trains in full: untied in
                                              # the merge as in memory (it kept the tie: the head became the trained
                                              # embedding), and trained biases of LoRA layers (they were "weights the base lacks")
                                              ("tied", "lora", ["embed_tokens"]), ("tied", "lora", ["lm_head"]),
                                              ("tied", "lora", ["embed_tokens", "lm_head"]), ("qwen2", "lora", None)])
def test_stream_merge_equals_peft_merge(tmp_path, kind, method, save):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _tiny(kind)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # many shards
    peft = _adapter(_tiny(kind), method, save, grow=7 if save and kind != "tied" else 0)
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = peft(input_ids=ids).logits
    info = merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "out"), torch.float32, "30KB")
    assert info["shards"] > 1 and info["merged_layers"] > 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    if save and kind != "tied":
        reloaded.resize_token_embeddings(307)
    by_peft = PeftModel.from_pretrained(reloaded, tmp_path / "adapter").merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, by_peft[key], atol=1e-6), key


@pytest.mark.parametrize("tie", [False, True])
def test_added_tokens_on_a_base_loaded_from_its_directory(tmp_path, tie):
    """A base loaded from a directory whose vocabulary grows (model.add_tokens): PEFT then also saves
    <module>.modules_to_save.weight and the frozen <module>.original_module.weight, which the streamed
    merge refused as weights the base lacks (review of the session's changes)."""
    from transformers import AutoModelForCausalLM

    _tiny("tied" if tie else "llama").save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft = _adapter(model, "lora", ["embed_tokens", "lm_head"], grow=7)
    peft.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    assert any("original_module" in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    ids = torch.randint(0, 307, (2, 12))
    with torch.no_grad():
        ref = peft(input_ids=ids).logits
    merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "out"), torch.float32, "30KB", rows=307)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_a_pad_row_added_in_training_is_the_same_in_the_streamed_merge(tmp_path):
    """A tokenizer one token longer than the base (a pad dialtune added) and an adapter that does not
    carry the embeddings: training grew them with mean rows (loader.fit_embeddings), the streamed
    merge grows embed_tokens and the untied lm_head the same way (before, the merged model had one
    row fewer than its tokenizer: a pad id out of range), and its logits are the trained ones."""
    from transformers import AutoModelForCausalLM

    from model.loader import fit_embeddings

    _tiny("llama").save_pretrained(tmp_path / "base", max_shard_size="20KB")
    tokens = type("Tok", (), {"__len__": lambda self: 301})()
    torch.manual_seed(123)  # whatever the random state, the grown rows are the mean rows
    trained = fit_embeddings(_tiny("llama"), tokens)
    peft = _adapter(trained, "lora")
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 300, 42, 300]])  # the added row, as input and as a logit
    with torch.no_grad():
        ref = peft(input_ids=ids).logits
    merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "out"), torch.float32, rows=301)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert merged.config.vocab_size == 301 and merged.get_output_embeddings().weight.shape[0] == 301
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4
    base = _tiny("llama")
    for emb in (merged.get_input_embeddings(), merged.get_output_embeddings()):
        name = "embed" if emb is merged.get_input_embeddings() else "head"
        source = base.get_input_embeddings() if name == "embed" else base.get_output_embeddings()
        assert torch.allclose(emb.weight[300], source.weight.mean(0), atol=1e-6), name


def test_wrong_base_is_refused(tmp_path):
    _tiny("llama").save_pretrained(tmp_path / "base")
    _adapter(_tiny("gpt2"), "lora").save_pretrained(tmp_path / "adapter")
    with pytest.raises(MergeError, match="weights the base lacks"):
        merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "out"), torch.float32)
    assert not (tmp_path / "out").exists()


def test_export_streams_a_large_base_in_bounded_memory(tmp_path):
    """A 440 MB (fp32) base merged with 50 MB shards: the merging process grows by far less than
    the model (the in-memory merge would hold all of it), and `merge()` says what it did."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    big = LlamaForCausalLM(cfg)
    n_bytes = 4 * sum(p.numel() for p in big.parameters())
    big.save_pretrained(tmp_path / "base", max_shard_size="50MB")
    from peft import LoraConfig, get_peft_model

    get_peft_model(big, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    del big
    from tests.conftest import TOKENIZER_DIR
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(tmp_path / "adapter")
    code = f"""
import json, sys, psutil
sys.path.insert(0, {str(ROOT)!r})
from model.export import merge
import peft, transformers, datasets  # imported before the baseline: only the merge itself counts
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
before = psutil.Process().memory_info().rss
summary = merge({str(tmp_path / 'adapter')!r}, {str(tmp_path / 'out')!r}, base_path={str(tmp_path / 'base')!r},
                dtype="bf16", max_shard_size="50MB", stream_above_gb=0.1)
# VmHWM is this process image's peak RSS (ru_maxrss would include the forking parent's)
peak = 1024 * int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
print(json.dumps({{"growth": peak - before, "summary": summary}}))
"""
    # glibc raises its mmap threshold after each large free (up to 32 MB), so freed fp32 temporaries
    # of this model's 10-30 MB tensors land in the heap and the high-water mark wanders by ~70 MB
    # from run to run; a fixed threshold measures the merge, not the allocator (an 8B model's
    # layers are far above 32 MB and always mmapped)
    env = {**run_env(1), "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n_bytes > 400e6 and out["growth"] < 0.45 * n_bytes, (out["growth"], n_bytes)
    assert out["summary"]["verify_max_abs_logit_diff"] is None and "tensor by tensor" in out["summary"]["verify_reference"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    assert "tensor by tensor" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_dequantized_gpt2_keeps_its_conv1d_layout(tmp_path, mode):
    """bitsandbytes replaces GPT-2's Conv1D layers ([in, out]) by Linears ([out, in]); dequantized as
    Linears they were saved under GPT-2's config, which then failed to load (a square one would load
    transposed, silently wrong): the round trip writes them back as Conv1D (arch probe)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    from model.dequantize import dequantize_

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / "b")
    bnb = (BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b", quantization_config=bnb, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 10))
    assert dequantize_(model)["layers"] == 8
    model.save_pretrained(tmp_path / "d")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    assert type(back.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
