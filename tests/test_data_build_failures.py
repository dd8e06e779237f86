"""A cache build that dies or fails: a killed multi-process build leaves no worker and no lock
behind, and a build that fails in any way stops every rank of a job with one sentence."""
import json
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
            def fn(batch):  # a long tokenization under way in each worker (which says so in a file: a
                # print of theirs to the pipe went missing twice in CI under load)
                open(os.path.join({str(tmp_path)!r}, "worker-%d" % os.getpid()), "w").close()
                time.sleep(600)
            return fn

        ds._tokenize_fn = slow_tokenize_fn
        d = dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}], num_proc=2, fast_tokenization=False)
        prepare_cached(d, *tiny_tok(), log=lambda m: None)
    """)
    err = open(tmp_path / "build.err", "w")
    proc = subprocess.Popen([sys.executable, "-c", script], env=run_env(1), stdout=subprocess.DEVNULL,
                            stderr=err, text=True, cwd=str(ROOT))
    workers, forked = [], set()
    try:
        deadline, both = time.time() + 240, None
        while True:  # both map workers under way (or one, 10 s after it: the point is a forked worker under the lock)
            workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
            both = both or (time.time() + 10 if workers else None)
            if len(workers) == 2 or (both and time.time() > both):
                break
            assert proc.poll() is None and time.time() < deadline, (
                f"no map worker started: {(tmp_path / 'build.err').read_text()[-3000:]}")
            time.sleep(0.2)
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
    train, _, _, stats, _ = prepare_cached(dcfg(tmp_path, train_files=[path], num_proc=2, fast_tokenization=False), *tiny_tok(),
                                           log=no_waiting)  # (the same cache key)
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


def test_a_build_that_fails_outside_validation_stops_both_ranks_with_one_sentence(tmp_path):
    """Rank 0 builds the cache and hits a full disk (a file-size limit here: EFBIG, as ENOSPC or a
    quota would); rank 1, waiting on the filesystem for the result, must stop too, not poll for ever
    while rank 0 waits for it in the ranks' agreement."""
    import resource

    from launch import name_cpu_accelerator
    from launch.cli import launch_command

    big = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * 18_000},
                         {"role": "assistant", "content": f"answer {i}"}]} for i in range(300)]  # ~27 MB as Arrow
    path = jsonl(tmp_path / "big.jsonl", big)
    limit = 16 << 20  # above the tiny base model a run writes first, below the cache

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ: writes fail with EFBIG)

    args = [f"run.root={tmp_path / 'runs'}", "train.progress_bar=false", "logger=none", "data=custom",
            f"data.train_files=[{path}]", "data.eval_files=[]", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]
    env = run_env(1)
    name_cpu_accelerator(env)
    proc = subprocess.Popen(launch_command(args, 2), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), preexec_fn=limit_file_size, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: only what this test started
        out, err = proc.communicate()
        raise AssertionError(f"the ranks hung after the failed build:\n{err[-3000:]}")
    errors = [line for line in err.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert f"writing the data cache {tmp_path / 'cache'}" in errors[0] and "File too large" in errors[0], errors
    assert errors[0].endswith("or set data.cache_dir to a disk with room."), errors


def test_a_killed_tokenization_worker_is_one_sentence_that_waiting_ranks_read_too(tmp_path):
    """A map worker killed (the kernel's OOM killer, here SIGKILL): datasets' RuntimeError becomes
    one sentence, and the .failed note that the job's waiting ranks stop on says it too."""
    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import glob, json, os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import data_pipeline.dataset as ds
        from data_pipeline.cache import prepare_cached
        from data_pipeline.chat import DataError
        from tests.data_helpers import dcfg, tiny_tok

        def slow_tokenize_fn(*args):
            def fn(batch):
                print("WORKER", os.getpid(), flush=True)
                time.sleep(600)
            return fn

        ds._tokenize_fn = slow_tokenize_fn
        d = dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}], num_proc=2, fast_tokenization=False)
        try:
            prepare_cached(d, *tiny_tok(), log=lambda m: None)
        except DataError as e:
            failed = glob.glob(str(Path({str(tmp_path)!r}) / "cache" / "*.failed"))
            print("RESULT", json.dumps([str(e), json.load(open(failed[0]))["message"] if failed else None]), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=run_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT))
    try:
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line
        os.kill(int(line.split()[1]), signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    said, noted = json.loads(out.split("RESULT ", 1)[1])
    assert said == noted and said.startswith("a tokenization worker (data.num_proc=2) died while preparing ") and said.endswith(
        ", killed (most likely out of memory); lower data.num_proc, or give the job more memory."), said


def test_any_build_failure_is_noted_for_the_waiting_ranks(tmp_path, monkeypatch):
    """A failure nobody foresaw (a bug) keeps its traceback on the builder; the job's other ranks
    read the note it leaves and stop with one sentence naming it, instead of waiting for ever."""
    import socket

    import data_pipeline.cache as cache
    from data_pipeline.chat import DataError

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cache, "build", broken)
    d = dcfg(tmp_path, train_files=[jsonl(tmp_path / "a.jsonl", GOOD)])
    tok, eot = tiny_tok()
    try:
        prepare_cached(d, tok, eot, log=lambda m: None)
    except ZeroDivisionError:
        pass

    def no_waiting(message):
        raise AssertionError(f"rank 1 waits for a build that failed: {message}")

    try:
        prepare_cached(d, tok, eot, local_rank=1, log=no_waiting, poll_s=0.1)  # another rank of this job
    except DataError as e:
        said = str(e)
    assert said.endswith(f"failed on {socket.gethostname()} (ZeroDivisionError: division by zero); its traceback is in "
                         "that process's output."), said
