"""model/memory.py: the activation estimate behind kernels.memory_budget_gib, held against the
Llama-3-8B measurements of bench/RESULTS.md (H200, 2026-11-28), and the layer choice it drives."""
import pytest
import torch

from model import kernels, memory

GIB = 2**30
LORA_PARAMS = 41_943_040  # LoRA r16 on the 7 projections of Llama-3-8B
# measured peak GiB with every layer checkpointed, and with 16 of 32 layers kept (checkpoint_every=2)
MEASURED = {"bf16": (17.6, 30.8), "int8": (11.1, 24.3), "nf4": (8.0, 21.1)}
# what is allocated once the base and adapter are loaded (weights: 7.0 B linear + 1.05 B embedding/head
# parameters; the fp32 adapter)
ALLOCATED = {"bf16": 8.03e9 * 2, "int8": 6.98e9 + 1.05e9 * 2, "nf4": 6.98e9 * 0.53 + 1.05e9 * 2}


def _llama3_8b():
    from bench.common import shape_config

    return shape_config("llama3-8b")


def _plan(quant, budget_gib, **kw):
    args = dict(budget_bytes=budget_gib * GIB, allocated_bytes=int(ALLOCATED[quant] + LORA_PARAMS * 4),
                trainable_params=LORA_PARAMS, tokens=4096, lora_dropout=0.05, liger=True, fused_ce=True,
                ce_chunk_size=1024)
    return memory.plan(_llama3_8b(), **{**args, **kw})


def test_layer_estimate_matches_the_measured_llama3_8b_layer():
    measured = [(kept - floor) / 16 for floor, kept in MEASURED.values()]  # 0.82-0.83 GiB a layer
    est = memory.layer_activation_bytes(_llama3_8b(), 4096, lora_dropout=0.05, liger=True) / GIB
    assert all(1.0 <= est / m <= 1.06 for m in measured), (est, measured)
    # what the table says moves it: no dropout copies, or no Liger (fp32 RMSNorm internals)
    assert memory.layer_activation_bytes(_llama3_8b(), 4096, lora_dropout=0.0, liger=True) / GIB < 0.75 * est
    h, i, kv = 4096, 14336, 1024
    no_liger = memory.layer_activation_bytes(_llama3_8b(), 4096, lora_dropout=0.05, liger=False)
    assert no_liger - est * GIB == pytest.approx((2 * h + i) * 2 * 4096 * memory.MARGIN, rel=1e-6)  # fp32 norm inputs, SiLU out
    masked = memory.layer_activation_bytes(_llama3_8b(), 4096, lora_dropout=0.05, liger=True, masked=True)
    assert masked - est * GIB == pytest.approx(2 * (h - kv) * 2 * 4096 * memory.MARGIN, rel=1e-6)  # k, v repeated per head
    assert memory.layer_activation_bytes(_llama3_8b(), 8192, lora_dropout=0.05, liger=True) / GIB == pytest.approx(2 * est)


@pytest.mark.parametrize("quant", sorted(MEASURED))
def test_plan_stays_within_the_budget_on_the_measured_runs(quant):
    floor, _ = MEASURED[quant]
    per_layer = (MEASURED[quant][1] - floor) / 16
    p = _plan(quant, 24)
    # on the safe side of the all-checkpointed measurement, by less than 1 GiB
    assert floor <= p.floor_gib <= floor + 1.0
    # the peak the kept layers give on the measured run: under 24 GiB, and within 3 layers of it
    real = floor + p.keep * per_layer
    assert real <= 24 and real + 3 * per_layer > 24, (p, real)
    assert p.peak_gib <= 24 and 0 < p.keep < p.layers


def test_plan_edges_and_monotone_in_the_budget():
    keeps = [_plan("nf4", b).keep for b in (4, 10, 16, 24, 40, 80)]
    assert keeps[0] == 0 and keeps[-1] == 32 and keeps == sorted(keeps)
    p = _plan("bf16", 10)
    assert p.keep == 0 and "every decoder layer recomputes" in p.describe(10, 4096)
    assert "keep their activations" in _plan("int8", 24).describe(24, 4096)
    # full logits instead of the fused chunks: the 128k-vocab logits of 4,096 tokens need room too
    assert _plan("nf4", 24, fused_ce=False).keep < _plan("nf4", 24).keep


def _tiny(layers=5):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_checkpoint_layers_spreads_the_kept_layers_and_keeps_the_gradients():
    model = _tiny()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    want = _grads(model, ids)  # every layer recomputed
    layers = model.model.layers
    assert kernels.checkpoint_layers(model, 2) == 3
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, True, False]
    calls = [0] * len(layers)
    for j, layer in enumerate(layers):  # an inner module: the recompute runs the layer's forward again
        layer.mlp.register_forward_pre_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    for got, ref in zip(_grads(model, ids), want):
        torch.testing.assert_close(got, ref)
    assert calls == [2, 2, 1, 2, 1]  # the kept layers really skip the recompute in backward
    # called again (re-planned), and every count: exactly `keep` layers left out
    for n in (1, 5, 7, 32):
        m = _tiny(n)
        for keep in range(n + 1):
            assert kernels.checkpoint_layers(m, keep) == n - keep and kernels.checkpointed_count(m) == n - keep
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="not enabled"):
        kernels.checkpoint_layers(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4)), 1)


def _cfg(**over):
    from types import SimpleNamespace as NS

    c = NS(kernels=NS(memory_budget_gib=1.0, fused_ce=True, ce_chunk_size=1024, fast_int8=True),
           model=NS(gradient_checkpointing=True, dtype="bf16"), deepspeed=NS(stage=2, reduce_bucket_size=50_000_000),
           peft=NS(method="lora", dropout=0.05), quant=NS(mode="none", compute_dtype="bf16"),
           train=NS(micro_batch_size=2, max_seq_len=None), data=NS(max_seq_len=4096))
    for key, value in over.items():
        section, field = key.split("__")
        setattr(getattr(c, section), field, value)
    return c


def test_apply_budget_plans_on_cuda_and_says_why_not_elsewhere(monkeypatch):
    cuda = torch.device("cuda")
    model = _tiny(8)
    assert memory.apply_budget(model, _cfg(kernels__memory_budget_gib=0.0), cuda, True, masked=False) is None
    for over, why in ((dict(), "CUDA only"), (dict(deepspeed__stage=3), "ZeRO-3"), (dict(peft__method="dora"), "DoRA"),
                      (dict(quant__mode="int8", kernels__fast_int8=False), "LLM.int8")):
        dev = torch.device("cpu") if not over else cuda
        msg = memory.apply_budget(model, _cfg(**over), dev, True, masked=False)
        assert why in msg and "every decoder layer recomputes" in msg and kernels.checkpointed_count(model) == 8
    assert "has no effect" in memory.apply_budget(model, _cfg(model__gradient_checkpointing=False), cuda, True, False)
    # on "CUDA": the tiny model's layers hold ~11 MB each at 2 x 4096 tokens; 0.37 GiB of DeepSpeed buckets
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 10 * 2**20)
    per_layer = memory.layer_activation_bytes(model.config, 8192, lora_dropout=0.05, liger=True)
    msg = memory.apply_budget(model, _cfg(kernels__memory_budget_gib=0.45), cuda, True, masked=False)
    p = memory.plan(model.config, budget_bytes=0.45 * GIB, allocated_bytes=10 * 2**20,
                    trainable_params=sum(t.numel() for t in model.parameters()), tokens=8192, lora_dropout=0.05,
                    liger=True, fused_ce=True, ce_chunk_size=1024, reserved_bytes=400_000_000)
    assert 0 < p.keep < 8 and f"{p.keep} of 8 decoder layers keep their activations" in msg, (msg, per_layer)
    assert kernels.checkpointed_count(model) == 8 - p.keep


def test_auto_budget_is_what_the_gpu_has_free_less_the_headroom(monkeypatch):
    """kernels.memory_budget_gib=auto: what PyTorch holds (reserved) + what the device has free, less
    10% of the card (at least 4 GiB); on an 80 GiB card with 9 GiB reserved and 70 free that is 71
    GiB, and it plans with that."""
    assert memory.auto_budget_bytes(70 * GIB, 80 * GIB, 9 * GIB) == 71 * GIB
    assert memory.auto_budget_bytes(20 * GIB, 24 * GIB, 3 * GIB) == 19 * GIB  # small card: the 4 GiB floor
    assert memory.budget_problem("auto", 1) is None and memory.budget_problem(" Auto ", 1) is None
    assert memory.budget_problem(0, 1) is None and memory.budget_problem(24, 1) is None
    assert "neither" in memory.budget_problem("24GB", 1) and "neither" in memory.budget_problem(True, 1)
    assert "not a GiB count" in memory.budget_problem(float("nan"), 1) and "not a GiB count" in memory.budget_problem(-1, 1)
    cuda = torch.device("cuda")
    model = _tiny(8)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 10 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 20 * 2**20)  # 10 MiB cached: reusable
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(4.45 * GIB), 5 * GIB))
    msg = memory.apply_budget(model, _cfg(kernels__memory_budget_gib="auto"), cuda, True, masked=False)
    budget = 20 * 2**20 + int(4.45 * GIB) - 4 * GIB
    p = memory.plan(model.config, budget_bytes=budget, allocated_bytes=10 * 2**20,
                    trainable_params=sum(t.numel() for t in model.parameters()), tokens=8192, lora_dropout=0.05,
                    liger=True, fused_ce=True, ce_chunk_size=1024, reserved_bytes=400_000_000)
    assert msg.startswith(f"kernels.memory_budget_gib=auto ({budget / GIB:.1f} GiB of this 5 GiB GPU): ")
    assert 0 < p.keep < 8 and f"{p.keep} of 8 decoder layers keep their activations" in msg
    assert kernels.checkpointed_count(model) == 8 - p.keep
    assert "CUDA only" in memory.apply_budget(model, _cfg(kernels__memory_budget_gib="auto"), torch.device("cpu"), True, masked=False)


def test_full_finetune_states_say_when_they_cannot_fit():
    """Weights + gradients + Adam (12 bytes) per GPU by ZeRO stage and offload, and the sentence
    that stops a full fine-tune that could only run out of memory."""
    from omegaconf import OmegaConf

    from model.memory import GIB, full_finetune_problem, full_finetune_state_bytes

    p = 8_030_000_000  # Llama-3-8B
    one = full_finetune_state_bytes(p, weight_bytes=2, stage=2, world=1, offload_optimizer=False, offload_param=False)
    assert one == p * 16
    eight = full_finetune_state_bytes(p, weight_bytes=2, stage=2, world=8, offload_optimizer=False, offload_param=False)
    assert eight == p * (2 + 2 / 8 + 12 / 8)
    # offloaded: ZeRO-3 keeps nothing of it on the GPU, ZeRO-2 the weights
    assert full_finetune_state_bytes(p, weight_bytes=2, stage=3, world=1, offload_optimizer=True, offload_param=True) == 0
    assert full_finetune_state_bytes(p, weight_bytes=2, stage=2, world=1, offload_optimizer=True, offload_param=False) == p * 2
    assert full_finetune_state_bytes(p, weight_bytes=2, stage=0, world=8, offload_optimizer=False, offload_param=False) == p * 16
    # fp32 training has no separate master copy: weights, gradients, two moments
    assert full_finetune_state_bytes(p, weight_bytes=4, stage=0, world=1, offload_optimizer=False, offload_param=False) == p * 16

    def cfg(stage, opt="none", param="none"):
        return OmegaConf.create({"model": {"dtype": "bf16"}, "quant": {"mode": "none"},
                                 "deepspeed": {"stage": stage, "offload_optimizer": opt, "offload_param": param}})

    card = 80 * GIB
    problem = full_finetune_problem(cfg(2), p, 1, card)
    assert problem.startswith("full fine-tuning (peft=none) of 8.03 B parameters needs ~120 GiB per GPU") and "recipe=full_zero3_offload" in problem
    assert full_finetune_problem(cfg(2), p, 8, card) is None
    assert full_finetune_problem(cfg(3, "cpu", "cpu"), p, 1, card) is None
    assert full_finetune_problem(cfg(2, "cpu"), p, 1, card) is None  # zero2_offload: the 16 GiB of weights
    # 70 B: its weights alone do not fit where each rank loads the whole model, offloaded or not
    big = full_finetune_problem(cfg(3, "cpu", "cpu"), 70_600_000_000, 8, card)
    assert "its 132 GiB of weights do not fit on this 80 GiB GPU" in big and "recipe=lora_int8 or qlora_nf4" in big



def test_parameter_count_from_the_config_alone(tmp_path):
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from model.loader import build_tiny, load_tokenizer, parameter_count
    from train.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train")
    build_tiny(cfg.model, load_tokenizer(cfg.model), str(tmp_path / "tiny"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny"))
    assert parameter_count(cfg, str(tmp_path / "tiny")) == sum(p.numel() for p in model.parameters()) > 0


def test_apply_budget_counts_fused_lora_layers_as_dropout_free(monkeypatch):
    """kernels.fused_lora keeps each LoRA input once whatever the dropout, and its SwiGLU keeps no
    down_proj input: the budget plans with the smaller per-layer figure (more layers kept)."""
    from peft import LoraConfig, get_peft_model

    from model import fused_lora
    from model.fused_lora import fuse_lora

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 10 * 2**20)
    model = get_peft_model(_tiny(8), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)

    def planned(dropout, fused=frozenset()):
        return memory.plan(model.config, budget_bytes=0.45 * GIB, allocated_bytes=10 * 2**20, trainable_params=trainable,
                           tokens=8192, lora_dropout=dropout, liger=True, fused_ce=True, ce_chunk_size=1024,
                           reserved_bytes=400_000_000, fused=fused).keep

    assert planned(0.05, fused_lora.ALL_PARTS) > planned(0.05, {"lora"}) == planned(0.0) > planned(0.05)
    msg = memory.apply_budget(model, _cfg(kernels__memory_budget_gib=0.45), cuda, True, masked=False)
    assert f"{planned(0.05)} of 8 decoder layers keep" in msg
    fuse_lora(model)
    msg = memory.apply_budget(model, _cfg(kernels__memory_budget_gib=0.45), cuda, True, masked=False)
    assert f"{planned(0.05, fused_lora.ALL_PARTS)} of 8 decoder layers keep" in msg
