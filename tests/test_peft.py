"""Adapters across architectures, optimizers, and what k-bit preparation leaves alone."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from model import loader
from tests.conftest import read_metrics, train
from train.config import DialtuneConfig

SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ARCHS = {
    "llama": ("LlamaConfig", SEVEN),
    "qwen2": ("Qwen2Config", SEVEN),
    "mistral": ("MistralConfig", SEVEN),
    "gemma": ("GemmaConfig", SEVEN),
    "phi3": ("Phi3Config", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt2": ("GPT2Config", {"c_attn", "c_proj", "c_fc"}),
}


def _cfg(**peft):
    cfg = OmegaConf.structured(DialtuneConfig)
    cfg.model.dtype = "fp32"
    cfg.peft.dropout = 0.0
    for k, v in peft.items():
        cfg.peft[k] = v
    return cfg


def _tiny(arch):
    import transformers

    name, _ = ARCHS[arch]
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        kw = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
        if arch == "gemma":
            kw["head_dim"] = 8
        config = getattr(transformers, name)(**kw)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_all_linear_targets_per_architecture_train_and_merge(arch):
    _, expected = ARCHS[arch]
    model = loader.attach_adapter(_tiny(arch), _cfg())
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert wrapped == expected, wrapped
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 300, (2, 12))
    # make the adapter non-trivial, then check gradients reach it and the merge is exact
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        got = merged(input_ids=ids).logits
    assert (want - got).abs().max() <= 1e-4


def test_explicit_targets():
    model = loader.attach_adapter(_tiny("llama"), _cfg(target_modules=["q_proj", "v_proj"]))
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert wrapped == {"q_proj", "v_proj"}


def test_targets_or_modules_to_save_that_match_nothing_are_one_sentence():
    """PEFT's NoMatchingPeftModuleError traceback (after the model loaded) for a mistyped target, and
    silence for a mistyped modules_to_save, became one sentence naming what the model has."""
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=r"^peft.target_modules=\['qproj'\] matches no layer of LlamaForCausalLM; its linear "
                                          r"layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj \(or use \[all-linear\]\).$"):
        loader.attach_adapter(_tiny("llama"), _cfg(target_modules=["qproj"]))
    with pytest.raises(ConfigError, match=r"of GPT2LMHeadModel; its linear layers are c_attn, c_fc, c_proj \(or use"):
        loader.attach_adapter(_tiny("gpt2"), _cfg(target_modules=["q_proj"]))  # (Conv1D layers: the list was empty)
    with pytest.raises(ConfigError, match=r"^peft.modules_to_save has 'lmhead', which is no module of LlamaForCausalLM"):
        loader.attach_adapter(_tiny("llama"), _cfg(modules_to_save=["lmhead"]))
    model = loader.attach_adapter(_tiny("llama"), _cfg(modules_to_save=["lm_head"]))
    assert any("modules_to_save" in n for n, _ in model.named_modules())


def test_lora_on_tied_embeddings_or_head_is_refused_before_training():
    """One weight serves both: a merged LoRA update on lm_head changes embed_tokens too (the export
    failed its logit check after training, or took a --tolerance that accepted a wrong model)."""
    import transformers

    from train.config import ConfigError

    def tied():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True))

    for target in (["q_proj", "lm_head"], ["embed_tokens", "v_proj"]):
        with pytest.raises(ConfigError, match=r"ties its input embeddings and output head \(embed_tokens = lm_head, one "
                                              r"weight\).*peft.modules_to_save=\[embed_tokens,lm_head\]"):
            loader.attach_adapter(tied(), _cfg(target_modules=target))
    loader.attach_adapter(tied(), _cfg(target_modules=["q_proj"]))  # the rest of a tied model is fine,
    loader.attach_adapter(_tiny("llama"), _cfg(target_modules=["q_proj", "lm_head"]))  # and an untied head


def test_kbit_base_keeps_embeddings_and_head_in_16_bit(tmp_path):
    """No fp32 upcast of embed_tokens / lm_head (memory); the adapter still trains."""
    base = _tiny("llama")
    base.save_pretrained(tmp_path / "base")
    cfg = _cfg()
    cfg.model.dtype, cfg.quant.mode, cfg.model.gradient_checkpointing = "bf16", "nf4", True
    model = loader.attach_adapter(loader.load_base(cfg, str(tmp_path / "base"), torch.device("cpu")), cfg)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in model.modules()) == 14
    ids = torch.randint(0, 300, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["optim=adamw_8bit"], ["optim=paged_adamw_8bit"],
                                       ["optim=cpu_adam", "deepspeed=zero2_offload"]], ids=["8bit", "paged", "cpu_adam_offload"])
def test_optimizers_train(tmp_path, overrides):
    train(overrides + ["train.max_steps=3", "train.micro_batch_size=2", "logger=none", "export.merge_at_end=false",
                       "data.eval_files=[]", "optim.lr=1e-2", "run.name=o"], tmp_path)
    rows = read_metrics(tmp_path / "o")
    assert len(rows) == 3 and rows[-1]["train/loss"] < rows[0]["train/loss"]


@pytest.mark.slow
def test_lora_on_the_embeddings_and_head_under_zero3_saves_whole_tensors_and_merges(tmp_path):
    """LoRA on embed_tokens / lm_head: PEFT saves their frozen base weights whole with the adapter;
    under ZeRO-3 those are partitioned too, and were saved as empty (0,) tensors, so the merge at the
    end failed on a size mismatch."""
    from safetensors.torch import load_file

    train(["recipe=demo", "deepspeed=zero3", "peft.target_modules=[q_proj,embed_tokens,lm_head]", "train.max_steps=2",
           "logger=none", "eval.at_end=[]", "data.eval_files=[]", "export.eval_conversations=4", "run.name=emb",
           "train.log_every=5"], tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "emb")] == [2]  # the last step is logged whatever train.log_every
    tensors = load_file(str(tmp_path / "emb" / "checkpoints" / "step_0000002" / "adapter" / "adapter_model.safetensors"))
    whole = {k: t.shape for k, t in tensors.items() if "base_layer" in k}
    assert whole and all(len(shape) == 2 and min(shape) > 0 for shape in whole.values()), whole
    assert (tmp_path / "emb" / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_added_special_token_is_trained_and_exported(tmp_path):
    """A new token (here a hand-off marker the agent emits) gets an embedding row and an output
    row that train (embed_tokens/lm_head join modules_to_save) and ship in the merged model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"I want a human, case {i}"},
                          {"role": "assistant", "content": "Transferring you now <|handoff|>"}]} for i in range(16)]
    data = tmp_path / "handoff.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train([f"data.train_files=[{data}]", "data.eval_files=[]", "model.add_tokens=['<|handoff|>']", "train.max_steps=3",
           "train.micro_batch_size=4", "logger=none", "optim.lr=1e-2", "run.name=tok", "export.eval_conversations=0"], tmp_path)
    run = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(run / "merged")
    new_id = tok.convert_tokens_to_ids("<|handoff|>")
    assert new_id == 4096  # appended after the tiny vocabulary
    saved = load_file(str(run / "checkpoints" / "step_0000003" / "adapter" / "adapter_model.safetensors"))
    emb = [t for k, t in saved.items() if "embed_tokens" in k]
    head = [t for k, t in saved.items() if "lm_head" in k]
    assert emb and head and emb[0].shape[0] == 4097
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == 4097
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    base.resize_token_embeddings(4097)
    # the new output row moved away from its initialisation: it was trained
    assert (merged.get_output_embeddings().weight[new_id] - base.get_output_embeddings().weight[new_id]).abs().max() > 1e-3
    assert json.loads((run / "merged" / "export_summary.json").read_text())["verify_max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_an_added_token_on_a_model_directory_base_under_zero3_saves_whole_tensors(tmp_path):
    """A base from a model directory (not the embedded tiny one) grows its vocabulary at load: PEFT then
    saves the frozen originals of embed_tokens/lm_head (modules_to_save) with the adapter, which under
    ZeRO-3 were empty partitions: the end-of-training merge failed on a [0]-shaped tensor (arch probe)."""
    from safetensors.torch import load_file

    base = loader.tiny_base(OmegaConf.structured(DialtuneConfig).model, str(tmp_path / "b"), build=True)
    train([f"model={base}", "deepspeed=zero3", "model.add_tokens=['<|handoff|>']", "train.max_steps=2", "logger=none",
           "eval.at_end=[]", "data.eval_files=[]", "export.eval_conversations=4", "run.name=z3tok"], tmp_path, nproc=2)
    saved = load_file(str(tmp_path / "z3tok" / "checkpoints" / "step_0000002" / "adapter" / "adapter_model.safetensors"))
    assert any("original_module" in k for k in saved) and all(t.numel() > 0 for t in saved.values())
    assert json.loads((tmp_path / "z3tok" / "merged" / "export_summary.json").read_text())["verify_max_abs_logit_diff"] <= 1e-4


def test_the_tiny_base_follows_model_tiny_unless_checkpoints_need_the_old_one(tmp_path):
    """<run_dir>/base is rebuilt when model.tiny changes and nothing was trained on it yet; with
    checkpoints of the run it is kept, and the run stops naming the changed settings."""
    from transformers import AutoConfig

    model_cfg = OmegaConf.structured(DialtuneConfig).model
    run = tmp_path / "run"
    base = loader.tiny_base(model_cfg, str(run), build=True)
    assert AutoConfig.from_pretrained(base).num_hidden_layers == model_cfg.tiny.num_hidden_layers
    model_cfg.tiny.num_hidden_layers = 1
    assert loader.tiny_base(model_cfg, str(run), build=False) == base  # another rank: reads, never writes
    loader.tiny_base(model_cfg, str(run), build=True)
    assert AutoConfig.from_pretrained(base).num_hidden_layers == 1
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_0000002")
    model_cfg.tiny.num_hidden_layers = 3
    with pytest.raises(ValueError, match=r"was built with other tiny-model settings \(model.tiny.num_hidden_layers 1 -> 3\) "
                                         r"and this run's checkpoints need it: keep them, or use another run.name.$"):
        loader.tiny_base(model_cfg, str(run), build=True)
    assert AutoConfig.from_pretrained(base).num_hidden_layers == 1
