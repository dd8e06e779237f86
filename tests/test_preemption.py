"""Preemption with real signals on a 2-process run: SIGUSR1 sets a flag, both ranks stop at the
same step boundary, save, and exit with the requeue code; resume continues from that step; SIGTERM
saves the same way but exits 143 (no requeue asked)."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launch import slurm
from tests.conftest import ROOT, read_metrics, run_env
from train.signals import REQUEUE_EXIT_CODE, TERM_EXIT_CODE

pytestmark = pytest.mark.slow


def test_requeue_code_is_shared_with_the_slurm_script():
    assert slurm.REQUEUE_EXIT_CODE == REQUEUE_EXIT_CODE == 85


def _signal_ranks_after(args, metrics, rows, sig):
    """Start a 2-rank run, send `sig` to both ranks (what SLURM does: every process of the step
    gets it) once metrics.jsonl has `rows` rows, and return (exit code, output)."""
    from launch.cli import launch_command

    proc = subprocess.Popen(launch_command(args, 2), env=run_env(1), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if any(a.startswith("--local_rank=") for a in p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        os.kill(p.pid, sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_sigusr1_saves_and_exits_85_then_resume_continues_and_sigterm_saves_without_requeue(tmp_path):
    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[lm]", "data.eval_files=[]", "export.merge_at_end=false", "run.name=pre"]
    run = tmp_path / "pre"
    rc, out = _signal_ranks_after(args, run / "metrics.jsonl", 2, signal.SIGUSR1)
    assert rc == REQUEUE_EXIT_CODE, out[-3000:]
    assert "asking to be requeued" in out
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] and summary["stop_signal"] == "SIGUSR1" and 2 <= stopped < 200
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 1))
    # the requeued job resumes; SIGTERM (scancel, preemption) saves too but exits 143: no requeue asked
    rc, out = _signal_ranks_after(args + ["train.resume=auto"], run / "metrics.jsonl", stopped + 1, signal.SIGTERM)
    assert rc == TERM_EXIT_CODE == 143, out[-3000:]
    assert "asking to be requeued" not in out and "stopped by SIGTERM" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_signal"] == "SIGTERM" and stopped < summary["steps"] < 200
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{summary['steps']:07d}"
    assert [r["step"] for r in read_metrics(run)] == list(range(1, summary["steps"] + 1))


def test_sigterm_before_training_starts_exits_at_once():
    """Before the loop there is nothing to save: SIGTERM ends the process (143) instead of waiting
    through data preparation and model loading; SIGUSR1 is kept for the first step boundary."""
    from train.signals import StopFlag

    flag = StopFlag()
    flag(signal.SIGUSR1, None)
    assert flag.usr1 and not flag.term
    with pytest.raises(SystemExit) as stopped:
        flag(signal.SIGTERM, None)
    assert stopped.value.code == TERM_EXIT_CODE
    flag.armed = True
    flag(signal.SIGTERM, None)
    assert flag.term


def test_stopping_raises_for_a_signal_that_came_before_or_comes_during_the_block():
    from train import signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    flag = signals.install()
    try:
        flag(signal.SIGUSR1, None)  # arrived after the loop's last look (during the final eval or save)
        with pytest.raises(signals.Stopped) as stopped:
            with signals.stopping():
                raise AssertionError("the block must not start")
        assert stopped.value.signal_name == "SIGUSR1" and stopped.value.exit_code == REQUEUE_EXIT_CODE
        flag.usr1 = False
        with pytest.raises(signals.Stopped) as stopped:
            with signals.stopping():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert stopped.value.signal_name == "SIGTERM" and stopped.value.exit_code == TERM_EXIT_CODE
        assert signal.getsignal(signal.SIGTERM) is flag and signal.getsignal(signal.SIGUSR1) is flag  # handlers restored
    finally:
        signals._installed = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_stop_signal_lost_in_a_finalizer_is_raised_where_the_merge_commits(capsys):
    """The merge's Stopped, raised by the signal handler inside a finalizer or weakref callback, is
    only printed by Python, and the merge went on to write the export: it is raised again where the
    export would take its place (model/export_io.write_export), and nothing is printed."""
    from train import signals

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(10_000):  # (the handler runs between these)
                pass

    with pytest.raises(signals.Stopped) as stopped:
        with signals.stopping():
            Finalized()  # (collected at once: the handler's exception is raised inside __del__)
            signals.check_stop()
    assert stopped.value.signal_name == "SIGUSR1" and "Exception ignored" not in capsys.readouterr().err
    with signals.stopping():  # a new block starts clean
        signals.check_stop()


def test_sigusr1_during_the_final_merge_then_the_requeued_job_writes_it_and_a_third_keeps_everything(tmp_path):
    """The run finished and saved; SIGUSR1 while the merge runs (it can take minutes on a real
    model) aborts the merge, leaves nothing half-written, and exits 85. The requeued job
    (train.resume=auto) finds the run finished: it trains nothing, keeps the summary (with the
    final eval) and writes the merge. Once more (a resubmission, a requeued sweep): the merge is
    kept too."""
    from tests.conftest import TRAIN_PY

    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=2", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[lm]", "run.name=m", "train.resume=auto"]
    run = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=run_env(1), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "merge: " in line:  # the merge's first phase has begun
            os.kill(proc.pid, signal.SIGUSR1)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert "SIGUSR1 after the last step: training is finished and saved, the merged checkpoint was not written; " \
           "the requeued job (train.resume=auto) writes it (exit 85)" in out
    assert "Traceback" not in out
    assert not (run / "merged").exists() and not (run / "merged.tmp").exists()
    before = json.loads((run / "summary.json").read_text())
    assert before["finished"] and "eval/loss" in before and not before["preempted"]
    # as a run signalled at its last step writes it (finished, and preempted there): a rerun must
    # not ask to be requeued again (it would, job after job)
    before.update(preempted=True, stop_signal="SIGUSR1")
    (run / "summary.json").write_text(json.dumps(before, indent=2))

    def rerun():
        proc = subprocess.run([sys.executable, str(TRAIN_PY), *args], env=run_env(1), cwd=str(ROOT),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "already finished at step 2" in proc.stdout + proc.stderr
        after = json.loads((run / "summary.json").read_text())
        assert after.pop("merged") == str(run / "merged") and after == before  # kept, and naming the merge
        assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2]  # nothing trained twice
        return (run / "merged" / "export_summary.json").stat().st_mtime_ns

    written = rerun()
    assert (run / "merged" / "model.safetensors").is_file()
    assert rerun() == written


def test_sigusr1_after_the_last_step_without_a_merge_still_asks_to_be_requeued(tmp_path):
    """SLURM's time-limit warning during the final eval of a run that merges nothing (a sweep's job
    with export.merge_at_end=false) was dropped: exit 0, and the sweep's next job trained on into
    the time limit without its warning. It exits 85; the requeued job finds the run finished."""
    from tests.conftest import TRAIN_PY

    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=2", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[lm]", "run.name=late", "train.resume=auto", "export.merge_at_end=false"]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *args], env={**run_env(1), "DIALTUNE_INJECT_SIGNAL": "eval:lm"},
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dialtune: SIGUSR1 after the last step: training is finished and saved; asking to be requeued (exit 85)" in proc.stdout
    assert json.loads((tmp_path / "late" / "summary.json").read_text())["finished"]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *args], env=run_env(1), cwd=str(ROOT), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "already finished at step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_ctrl_c_is_one_sentence_naming_the_latest_checkpoint(tmp_path):
    """SIGINT (Ctrl-C) stops a one-process run at once: exit 130 and a sentence naming the latest
    checkpoint and how to continue, not a page of KeyboardInterrupt traceback."""
    from tests.conftest import TRAIN_PY

    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "data.eval_files=[]", "export.merge_at_end=false", "run.name=c", "train.save_every=2"]
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=run_env(1), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "c" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    assert "dialtune: interrupted; the latest checkpoint is step_" in err and "train.resume=auto" in err


def _dialtune_train(args, nproc):
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--nproc", str(nproc), *args], env=run_env(1),
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _ranks_of(proc):
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline()[1:3])]


def test_sigterm_to_dialtune_train_reaches_the_ranks_and_nothing_keeps_training(tmp_path):
    """`kill -TERM` to `dialtune train`'s process group (a terminal's job, a scheduler): the
    deepspeed launcher's runner would die of it and leave the ranks training, its per-node
    launcher would kill them 30 s later; the command passes it to the ranks, which save and
    stop; it exits 143."""
    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[]", "export.merge_at_end=false", "run.name=cli"]
    run = tmp_path / "cli"
    proc = _dialtune_train(args, 2)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    ranks = _ranks_of(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == TERM_EXIT_CODE, out[-3000:]
    assert "got SIGTERM; passing it on to the training processes" in out and "stopped by SIGTERM" in out
    stopped = json.loads((run / "summary.json").read_text())["steps"]
    assert 2 <= stopped < 200 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert len(ranks) == 2 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_sigusr1_as_the_rank_starts_is_kept_for_the_first_step(tmp_path):
    """A SIGUSR1 that reaches `dialtune train` as its rank is starting (before the rank could handle
    it, it would have killed the rank): delivered once the rank handles it, a checkpoint at step 1,
    exit 85."""
    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[]", "export.merge_at_end=false", "run.name=early"]
    proc = _dialtune_train(args, 1)
    deadline = time.time() + 120
    while not _ranks_of(proc):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert (tmp_path / "early" / "checkpoints" / "latest").read_text().strip() == "step_0000001"


def test_what_dialtune_train_reports_after_a_signal():
    from launch.ranks import is_rank, outcome
    from launch.train import __file__ as train_py

    assert is_rank(["python", "-u", train_py, "--local_rank=0", "x=1"]) and is_rank(["python", train_py])
    assert not is_rank(["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", train_py])
    assert not is_rank(["python", "/usr/bin/deepspeed", "--num_gpus", "2", train_py])
    assert outcome(143, [], True) == 143 and outcome(-15, [], True) == 143 and outcome(2, [], False) == 2
    # the launcher chain died of the signal, the ranks (reaped here) saved: their codes
    assert outcome(-10, [85, 85], True) == 85 and outcome(-15, [143, 143], True) == 143 and outcome(-15, [143, -9], True) == 143
    assert outcome(-15, [-9, 143], True) == 137 and outcome(-15, [0, 0], True) == 0


def test_dialtune_train_returns_when_its_launcher_and_ranks_are_done(tmp_path):
    """A process the launcher chain leaves behind (a detached helper), orphaned to the command as
    the chain's subreaper, is not waited for; a signal this process ignores (nohup's SIGHUP) stays
    ignored."""
    from launch.ranks import run_ranks

    code = "import subprocess, sys; subprocess.Popen(['sleep', '30'], start_new_session=True); sys.exit(3)"
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        t0 = time.time()
        assert run_ranks([sys.executable, "-c", code], dict(os.environ)) == 3
        assert time.time() - t0 < 10 and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ctrl_z_stops_the_ranks_with_dialtune_train_and_a_sigkill_to_it_ends_them(tmp_path):
    """The ranks run in a session of their own: Ctrl-Z (SIGTSTP) to `dialtune train` stops them with
    it and SIGCONT (`fg`) continues them; SIGKILL to it (kill -9, a process-group SIGKILL; also while
    it is stopped) ends them within seconds instead of leaving them training (or stopped) unattended."""
    from launch.ranks import handles

    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[]", "export.merge_at_end=false", "run.name=tstp"]
    proc = _dialtune_train(args, 1)
    deadline = time.time() + 120
    while not (_ranks_of(proc) and handles(_ranks_of(proc)[0].pid, signal.SIGUSR1)):  # (set up before its watch)
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    rank = _ranks_of(proc)[0]

    def wait_for(check):
        t0 = time.time()
        while not check():
            assert time.time() - t0 < 10
            time.sleep(0.1)

    proc.send_signal(signal.SIGTSTP)
    wait_for(lambda: rank.status() == psutil.STATUS_STOPPED and psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED)
    proc.send_signal(signal.SIGCONT)
    wait_for(lambda: rank.status() != psutil.STATUS_STOPPED)
    proc.send_signal(signal.SIGTSTP)  # and `kill -9 %1` while stopped: the stopped rank is continued, then ends
    wait_for(lambda: rank.status() == psutil.STATUS_STOPPED)
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE)


def test_a_rank_follows_only_a_supervisor_on_its_own_host(monkeypatch):
    """A hostfile launch starts ranks on other nodes, where the supervisor's pid means nothing."""
    import socket
    import threading

    from train import signals

    def watchers():
        return sum(t.name == "dialtune-supervisor" for t in threading.enumerate())

    here = signals.supervisor_value()  # this (live) process: a watch that starts stays idle
    for value, watched in ((here.replace(socket.gethostname(), "another-node", 1), 0), ("garbage", 0), (here, 1)):
        monkeypatch.setenv(signals.SUPERVISOR_ENV, value)
        before = watchers()
        signals.follow_supervisor()
        assert watchers() - before == watched and signals.SUPERVISOR_ENV not in os.environ
