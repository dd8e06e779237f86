"""train/flops.py: matmul parameter and FLOP counts from transformers configs, peak FLOP/s, MFU."""
import pytest
import torch
import transformers

from train import flops


def _llama(**kw):
    base = dict(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**base, **kw})


def test_small_llama_by_hand():
    # per layer: q 16x16 + o 16x16 + k,v 2 x 16x(2 heads x 4) + gated MLP 3 x 16x40 = 2688
    # two layers + lm_head 100x16 = 6976; attention: 12 x 2 layers x 4 heads x 4 head_dim x seq
    assert flops.matmul_params(_llama()) == 2 * 2688 + 1600 == 6976
    assert flops.flops_per_token(_llama(), 10) == 6 * 6976 + 12 * 2 * 4 * 4 * 10 == 45696


def test_gqa_and_tied_embeddings():
    # k and v shrink with the kv heads; a tied head is still a matrix product per token
    assert flops.matmul_params(_llama(num_key_value_heads=4)) - flops.matmul_params(_llama()) == 2 * 2 * 16 * 8
    assert flops.matmul_params(_llama(tie_word_embeddings=True)) == flops.matmul_params(_llama())


ARCHS = {
    "llama": lambda: _llama(),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=1, head_dim=4),
    "gemma": lambda: transformers.GemmaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=4, n_positions=32),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_matmul_params_equal_the_models_linear_weights(arch):
    """The count from config field names equals the weights of the model's Linear/Conv1D modules
    (GQA, Gemma's wider heads, Phi-3's fused qkv and gate_up, GPT-2's plain MLP), lm_head included."""
    from transformers.pytorch_utils import Conv1D

    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    assert flops.matmul_params(model.config) == linear


def test_llama3_8b_numbers():
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8)
    n = flops.matmul_params(cfg)
    # 32 x (q,o 2 x 4096^2 + k,v 2 x 4096x1024 + MLP 3 x 4096x14336) + lm_head 128256x4096
    assert n == 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096 == 7_504_658_432
    assert 6 * n == pytest.approx(6 * 7.5e9, rel=1e-3)
    # at the bundled data's ~350-token conversations attention adds ~1.2 %
    fpt = flops.flops_per_token(cfg, 350)
    assert fpt - 6 * n == 12 * 32 * 32 * 128 * 350
    # the compute limit: 800 TFLOP/s / (6 x 8.0e9, all parameters counted) = 16,600 tok/s
    assert flops.mfu(16_600, 6 * 8.0e9, 800e12) == pytest.approx(1.0, abs=0.005)
    # with the matmul-only count (embedding lookup excluded) the same rate is ~95 % MFU
    assert flops.mfu(16_600, fpt, 800e12) == pytest.approx(0.946, abs=0.002)


def test_effective_seq_len_and_documents():
    assert flops.effective_seq_len([100, 300]) == (100**2 + 300**2) / 400 == 250
    assert flops.effective_seq_len([]) == 0.0
    cfg = _llama()
    assert flops.flops_for_documents(cfg, [100, 300]) == pytest.approx(
        100 * flops.flops_per_token(cfg, 100) + 300 * flops.flops_per_token(cfg, 300))


def test_mixture_of_experts_is_refused():
    cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    with pytest.raises(ValueError, match="mixture of experts"):
        flops.matmul_params(cfg)


def test_a_mixture_of_experts_trains_without_flops_metrics(tmp_path):
    """A MoE's active parameters per token are not counted: training logs no FLOPs/MFU and says so
    once (it crashed at step 1); PEFT's adapters on its fused expert weights refuse dropout: one sentence."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    from tests.conftest import TOKENIZER_DIR, read_metrics, train

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    args = [f"model={tmp_path / 'moe'}", "model.dtype=fp32", "train.max_steps=1", "logger=none", "eval.at_end=[]",
            "export.merge_at_end=false", "data.max_seq_len=256", "run.name=moe", "kernels.peak_tflops=1"]
    proc = train(args, tmp_path, check=False)
    assert proc.returncode == 2 and "keeps its experts' weights as parameters" in proc.stderr and "peft.dropout=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = train(args + ["peft.dropout=0"], tmp_path)
    assert "perf/model_tflops_per_device and perf/mfu are not logged: MixtralConfig is a mixture of experts" in proc.stdout + proc.stderr
    (row,) = [r for r in read_metrics(tmp_path / "moe") if "train/loss" in r]
    assert "perf/mfu" not in row and "perf/model_tflops_per_device" not in row and row["perf/target_tokens"] > 0
    assert flops.step_metrics(0.0, 1.0, 1, 1e12) == {} and flops.step_metrics(2e12, 1.0, 2, 2e12) == {
        "perf/model_tflops_per_device": 1.0, "perf/mfu": 0.5}


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", 165e12), ("Some Future GPU", None),
])
def test_peak_flops_table(monkeypatch, name, peak):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops("cuda") == peak
    assert flops.peak_flops("cuda", torch.float32) is None
    assert flops.peak_flops("cpu") is None


def test_peak_flops_override_and_mfu_without_peak(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_flops("cpu", override=5e14) == 5e14
    monkeypatch.setenv(flops.PEAK_ENV, "400")
    assert flops.peak_flops("cpu") == 400e12
    assert flops.mfu(1000.0, 1e9, None) is None
