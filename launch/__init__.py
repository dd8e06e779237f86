"""Entry points: train.py (every launcher), cli.py (`dialtune`), and the commands' modules."""
import logging
import os

# bitsandbytes' CPU backend warns at import that it cannot fetch an optional kernel from the hub
# (kernels-community): nothing is downloaded here, and CPU 4-bit runs without it; LLM.int8's matmul
# (kernels.fast_int8=false) warns at every call that it casts bf16 inputs to fp16, as designed
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


# deprecations inside the libraries (PEFT asks transformers' old `is_gradient_checkpointing`,
# DeepSpeed calls torch's old all_gather_into_tensor): nothing a user can act on, printed per rank
# and per step
QUIET_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated", r"`gradient_checkpointing_enable` is deprecated",
                      r"`torch.distributed.all_gather_into_tensor` is deprecated",
                      r"`torch.distributed.reduce_scatter_tensor` is deprecated",  # (ZeRO-3: per micro-batch and rank)
                      # PEFT's own patterns for a mixture of experts' fused expert weights, which it then adapts otherwise
                      r"The following (rank|alpha)_pattern keys did not match any targeted module")


def quiet_loggers() -> None:
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)


def name_cpu_accelerator(env=os.environ) -> None:
    """On a machine without a CUDA device, name DeepSpeed's accelerator (the CPU, what it would pick
    itself) in `env`, so that importing deepspeed does not warn "Setting accelerator to CPU. If you
    have GPU or other accelerator, we were unable to detect it" in every process of a CPU run. For
    processes that run on this machine only: a job submitted to other nodes detects theirs there."""
    if "DS_ACCELERATOR" not in env:
        import torch

        if torch.cuda.device_count() == 0:
            env["DS_ACCELERATOR"] = "cpu"
