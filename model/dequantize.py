"""The quantize -> dequantize round trip of a bitsandbytes base (export.base=dequantized):
every quantized linear replaced in place by an fp32 nn.Linear holding the weight its quantized
forward multiplies with, each checked against its quantized original on a random input first
(model/export.py's docstring has the measurements)."""
from __future__ import annotations

import copy
from typing import Dict

import torch


@torch.no_grad()
def _layer_error(module, weight, bias) -> float:
    """Relative output error (Frobenius) of `weight` (fp32) against the quantized `module` on a
    fixed random input in the module's compute dtype."""
    dev = weight.device
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(16, module.in_features, generator=gen, device=dev).to(dtype)
    want = torch.nn.functional.linear(x.float(), weight.reshape(module.out_features, module.in_features),
                                      None if bias is None else bias.float())
    got = module(x).float()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def fast_int8(cfg) -> bool:
    """Whether the run trained its int8 base with kernels.fast_int8 (model/kernels.py)."""
    if cfg is None or cfg.quant.mode != "int8":
        return False
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, "kernels.fast_int8", default=False))


def _conv1d_names(model) -> set:
    """Names of the modules the architecture builds as transformers' Conv1D (GPT-2's), from a
    weightless (meta) copy of it: the quantized model holds bitsandbytes Linears there."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if model.config.model_type not in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer"):
        return set()  # (every other causal LM builds nn.Linear layers; no copy needed)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {name for name, m in skeleton.named_modules() if isinstance(m, Conv1D)}


def dequantize_(model) -> Dict:
    """Replace every bitsandbytes Linear8bitLt / Linear4bit of model, in place and one module at
    a time, by an fp32 nn.Linear holding its dequantized weight; cast the rest to fp32 and drop
    the quantization config. Each layer's output on a random input is compared with the quantized
    original's first. Returns {"layers": how many, "max_rel_error", "worst_layer"}."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bf

    from .kernels import Int8DequantLinear

    conv = _conv1d_names(model)
    n, worst, worst_name = 0, 0.0, None
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8DequantLinear):  # kernels.fast_int8: the same int8 storage
            weight = bf.int8_vectorwise_dequant(module.weight.data, module.SCB).float()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w, state = module.weight, module.state
            # A forward pass moves CB/SCB from the parameter into the module's state.
            cb = w.CB if getattr(w, "CB", None) is not None else (state.CB if state.CB is not None else w.data)
            scb = w.SCB if getattr(w, "SCB", None) is not None else state.SCB
            weight = bf.int8_vectorwise_dequant(cb, scb).float()
        elif isinstance(module, bnb.nn.Linear4bit):
            data, qs = module.weight.data, module.weight.quant_state
            if getattr(qs, "packing_format_for_cpu", False):  # repacked by an avx512-bf16 CPU forward
                data, qs = bf._convert_weight_packed_for_cpu_inverse(data, qs)
            weight = bf.dequantize_4bit(data, qs).float()
        else:
            continue
        err = _layer_error(module, weight, module.bias)
        if err > worst or worst_name is None:
            worst, worst_name = err, name
        weight = weight.reshape(module.out_features, module.in_features)
        if name in conv:  # GPT-2's Conv1D ([in, out]), which bitsandbytes replaced by a Linear: saved in its own layout
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                new = Conv1D(module.out_features, module.in_features)
            new.weight = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            new.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        model.set_submodule(name, new)
        del module, weight
        n += 1
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    model.is_quantized = False
    model.float()
    return {"layers": n, "max_rel_error": worst, "worst_layer": worst_name}
