"""A cache build that dies or fails: a killed multi-process build leaves no worker and no lock
behind, and a build that fails in any way stops every rank of a job with one sentence."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from data_pipeline.cache import prepare_cached
from tests.conftest import ROOT, run_env
from tests.data_helpers import GOOD, dcfg, jsonl, tiny_tok


def _children(pid: int) -> list:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie holds no files and no memory)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_multiprocess_build_leaves_no_worker_and_blocks_no_later_run(tmp_path):
    """data.num_proc=2: the datasets map workers are forked while the builder holds the flock,
    which fork shares. Killed with SIGKILL, the builder must take its workers with it, and the
    next prepare must build at once, not wait for a lock an orphaned worker keeps."""
    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import data_pipeline.dataset as ds
        from data_pipeline.cache import prepare_cached
        from tests.data_helpers import dcfg, tiny_tok

        def slow_tokenize_fn(*args):
            def fn(batch):  # a long tokenization under way in each worker
                print("WORKER", os.getpid(), flush=True)
                time.sleep(600)
            return fn

        ds._tokenize_fn = slow_tokenize_fn
        d = dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}], num_proc=2, fast_tokenization=False)
        prepare_cached(d, *tiny_tok(), log=lambda m: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=run_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT))
    workers, forked = [], set()
    try:
        while len(workers) < 2:
            line = proc.stdout.readline()
            assert line, "the build ended before its map workers started"
            if line.startswith("WORKER"):
                workers.append(int(line.split()[1]))
        forked = set(_children(proc.pid)) | set(workers)  # the map workers and datasets' queue manager
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(_alive(p) for p in forked) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in forked if _alive(p)], "the killed build's workers outlived it"
    finally:
        proc.kill()
        for p in forked:
            if _alive(p):
                os.kill(p, signal.SIGKILL)  # (only the processes this test started)

    def no_waiting(message):
        assert "waiting for" not in message, message

    start = time.time()
    train, _, _, stats, _ = prepare_cached(dcfg(tmp_path, train_files=[path], num_proc=2), *tiny_tok(), log=no_waiting)
    assert stats["cache"]["hit"] is False and len(train) == len(GOOD) and time.time() - start < 120
    root = tmp_path / "cache"
    assert not list(root.glob("dialtune-data-*")) and not list(root.glob("*.lock"))


def test_waiting_on_a_lock_whose_taker_is_gone_says_what_to_do(tmp_path):
    """The lock held, though the pid it names is gone (a process it started keeps it): the waiting
    line says so and what to do, instead of waiting for a dead pid without a word."""
    import fcntl
    import socket

    from data_pipeline.cache import cache_key

    path = jsonl(tmp_path / "a.jsonl", GOOD)
    d = dcfg(tmp_path, train_files=[path])
    tok, eot = tiny_tok()
    root = tmp_path / "cache"
    root.mkdir()
    lock = root / f"{cache_key(d, tok, eot)}.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    lock.write_text(f"{socket.gethostname()} pid {dead} since then\n")

    class Said(Exception):
        pass

    def log(message):
        raise Said(message)

    with open(lock) as keeper:  # what an orphaned child of that pid would hold
        fcntl.flock(keeper, fcntl.LOCK_EX)
        try:
            prepare_cached(d, tok, eot, log=log)
        except Said as e:
            said = str(e)
    assert f"pid {dead} since then took it and is gone, and a process it started still holds it (`fuser -v {lock}` names it); " \
           f"end that process, or delete {lock} if nothing prepares" in said, said
