"""Launch environments: CUDA_VISIBLE_DEVICES on a machine without GPUs, CPU affinity, the node a
node launcher names outside SLURM, a run directory that cannot be created, and launcher variables
that are missing or ranks that never meet (one sentence each, not a traceback after the timeout)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TRAIN_PY, run_env


def test_cuda_visible_devices_is_ignored_without_gpus(monkeypatch, capsys):
    """On CPU, CUDA_VISIBLE_DEVICES=0 (a leftover export) refused --nproc 2, and =0,1 became
    --include localhost:0,1, which DeepSpeed's CPU launcher ends in a traceback: --num_gpus N there."""
    from launch.cli import launch_command

    monkeypatch.setattr("launch.cli._cuda_count", lambda: 0)
    for visible in ("0", "0,1", "3"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        cmd = launch_command(["a=1"], 2)
        assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd
