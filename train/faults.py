"""Fault injection for the robustness tests: DIALTUNE_INJECT_NAN=first[-last][,rank] makes the
forward of those steps on that rank (default 0) carry NaNs, as a real overflow does;
DIALTUNE_INJECT_EVAL_ERROR=part makes an evaluation of that part fail; DIALTUNE_INJECT_SIGNAL=step
sends SIGUSR1 at that step."""
from __future__ import annotations

import os
from typing import Optional, Tuple

from model import kernels


def injected_nan_steps() -> Optional[Tuple[int, int, int]]:
    """(first step, last step, rank) from DIALTUNE_INJECT_NAN, or None when it is unset."""
    inject = os.environ.get("DIALTUNE_INJECT_NAN", "")
    if not inject:
        return None
    steps, _, rank = inject.partition(",")
    first, _, last = steps.partition("-")
    return int(first), int(last or first), int(rank or 0)


def nan_activations(model):
    """The input embeddings come out NaN, so the forward and its backward carry NaNs as a real
    overflow does. Returns the hook's handle (remove it after the backward)."""
    return kernels.causal_lm(model).get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))


def fail_eval(parts) -> None:
    """DIALTUNE_INJECT_EVAL_ERROR=part: an evaluation that runs that part fails (RuntimeError), as a
    generation that runs out of GPU memory does."""
    if (part := os.environ.get("DIALTUNE_INJECT_EVAL_ERROR")) and part in parts:
        raise RuntimeError(f"injected failure of the {part} evaluation (DIALTUNE_INJECT_EVAL_ERROR)")
    if (when := os.environ.get("DIALTUNE_INJECT_SIGNAL", "")).startswith("eval:") and when[5:] in parts:
        import signal  # DIALTUNE_INJECT_SIGNAL=eval:part: SIGUSR1 as an evaluation of that part starts

        os.kill(os.getpid(), signal.SIGUSR1)


def signal_at(step: int) -> None:
    """DIALTUNE_INJECT_SIGNAL=step: this process sends itself SIGUSR1 as that step starts (a
    preemption notice at a chosen step, where a real one arrives at an unknown time)."""
    if os.environ.get("DIALTUNE_INJECT_SIGNAL") == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGUSR1)
