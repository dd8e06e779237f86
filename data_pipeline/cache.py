"""The prepared-data cache: a key that hashes everything that shaped the result (the bytes of every
source file, the tokenizer with its full JSON and chat template, the data config and
DATA_VERSION), and prepare_cached, which loads a hit or has one process build it. One process per
cache directory builds (the local rank 0 that wins an flock on the key's lock file: one per node
for a node-local cache, one per job for a shared one; the kernel drops it when the builder dies,
so a killed build blocks nobody); the others poll the filesystem for the result, so no
collective times out while a large corpus is prepared.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Dict, List

from .cache_lock import holder_is_dead, read_holder, take_lock
from .chat import DataError
from .dataset import DATA_VERSION, EVAL_MESSAGES, build, sources_of, validated_conversations
from .records import folder_problem, is_bundled_sample
from .stats_warnings import data_warnings
from .validate import Report, counts_text


def _digest_path(h, path: str) -> None:
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(p.encode() if p != path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def cache_key(d, tokenizer, eot_id: int) -> str:
    from omegaconf import OmegaConf

    h = hashlib.sha256(f"dialtune-data-v{DATA_VERSION}".encode())
    for s in sources_of(d):
        if problem := folder_problem(s["path"]):  # before hashing all of it
            raise DataError(problem)
        h.update(json.dumps(s, sort_keys=True).encode())
        _digest_path(h, s["path"])
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer).encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(json.dumps([tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, eot_id]).encode())
    cfg = OmegaConf.to_container(d, resolve=True)
    # these don't change the result (fast_tokenization does not either, by design, but it stays in: a
    # user who turns it off to rule the fast path out gets the exact path's build, not the cache)
    for k in ("cache_dir", "num_proc", "on_error", "max_errors_shown"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def load(path: str):
    from datasets import load_from_disk

    def opt(name):
        p = os.path.join(path, name)
        return load_from_disk(p) if os.path.isdir(p) else None

    with open(os.path.join(path, "stats.json")) as f:
        stats = json.load(f)
    return opt("train"), opt("eval"), opt("train_packs"), stats


def eval_conversations(cache_path: str) -> List[Dict]:
    """[{"messages", "source"}] of the eval split, in the order of its tokenized rows ([] if none)."""
    path = os.path.join(cache_path, EVAL_MESSAGES)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _job_token() -> str:
    """Names this job's processes on this node (a .failed file left by another job is not this one's):
    torchrun's run id where it has a real one (it is "none" unless --rdzv-id / --standalone gives one,
    for every job alike), else the rendezvous address and the per-node launcher's pid."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.getppid()}"


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dialtune", "data")


def _clean_dead(root: str, key: str) -> None:
    """Work folders a killed build of this key left behind (build() itself clears its .part); the
    caller holds the key's lock, so no live process uses them."""
    for name in os.listdir(root):
        if name.startswith(f"dialtune-data-{key}-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _stop_as_strict(d, path: str, stats: Dict) -> None:
    """A cache that a lenient run built without the records it skipped, hit by a strict run:
    one validation pass raises the same `file:line` errors a build would."""
    for _ in validated_conversations(d, Report("strict", d.max_errors_shown)):
        pass
    skipped = dict(stats["validation"]["skipped"])
    if (stats.get("unrenderable") or {}).get("count"):  # valid records the chat template refused
        skipped["unrenderable"] = stats["unrenderable"]["count"]
        where = f" (the template refused {', '.join(stats['unrenderable']['where'])})"
    else:
        where = ""
    raise DataError(f"{path} was prepared with data.on_error=lenient, which skipped {sum(skipped.values())} records "
                    f"({counts_text(skipped)}){where}; fix them, or set data.on_error=lenient "
                    "to train without them.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _as_data_error(e: BaseException, d, path: str):
    """A build failure the user can fix, as one sentence (DataError), or None."""
    if isinstance(e, DataError):
        return e
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:  # datasets wraps what its writer or generator raised
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" ({chain.filename})" if chain.filename else ""
            return DataError(f"writing the data cache {path} failed: {chain.strerror}{where}; free space there (or raise the "
                             "disk quota or file-size limit), or set data.cache_dir to a disk with room.")
        if isinstance(chain, RuntimeError) and "subprocesses has abruptly died" in str(chain):
            return DataError(f"a tokenization worker (data.num_proc={d.num_proc}) died while preparing {path}, killed (most "
                             "likely out of memory); lower data.num_proc, or give the job more memory.")
        chain = chain.__cause__ or chain.__context__
    return None


def _waiting_note(lock: str, path: str, waited: float, tried: bool) -> str:
    """What a waiting process says every minute: who builds, and what to do if nobody does any more
    (tried: this process just failed to take the lock, so it is held)."""
    excl = lock + ".excl"
    if os.path.isfile(excl):
        holder = read_holder(excl) or "another process"
        return (f"data: waiting for {holder} to prepare {path} ({waited:.0f} s so far; if that process died, "
                f"delete {excl})")
    if not os.path.exists(lock):  # nobody builds yet (the local rank 0 that will has not looked)
        return f"data: waiting for {path} to be prepared ({waited:.0f} s so far)"
    holder = read_holder(lock) or "another process"
    if tried and holder_is_dead(lock):  # held, yet not by the process that took it
        return (f"data: waiting for {lock} ({waited:.0f} s so far): {holder} took it and is gone, and a process it started "
                f"still holds it (`fuser -v {lock}` names it); end that process, or delete {lock} if nothing prepares "
                f"{path} any more.")
    return (f"data: waiting for {holder} to prepare {path} ({waited:.0f} s so far; if no process prepares it any more, "
            f"`fuser -v {lock}` names the one that holds the lock: end it, or delete {lock})")


def prepare_cached(d, tokenizer, eot_id: int, local_rank: int = 0, log=print, poll_s: float = 1.0):
    """(train, eval, train_packs, stats, path): a cache hit loads; otherwise one process per
    cache directory builds while the others wait on the filesystem. Either way the stats'
    warnings (data_warnings) are logged."""
    sources = sources_of(d)
    trained = {os.path.realpath(s["path"]) for s in sources if s["split"] == "train"}
    for s in sources:
        if s["split"] == "eval" and os.path.realpath(s["path"]) in trained:
            log(f"warning: held-out file {s['path']} is also a training file: the eval loss will be in-sample")
    sample_eval = [s["path"] for s in sources if s["split"] == "eval" and is_bundled_sample(s["path"])]
    if sample_eval and trained and not any(is_bundled_sample(p) for p in trained):  # (an eval's build reads no training file)
        log(f"warning: the held-out set holds the bundled sample's {sample_eval[0]} (data=sample, the default, lists it in "
            "data.eval_files), not held out from your data: set data.eval_files=[your held-out files], or "
            "data.eval_files=[] with data.eval_fraction=0.02 to hold out 2% of your conversations")
    root = d.cache_dir or default_cache_dir()
    os.makedirs(root, exist_ok=True)
    key = cache_key(d, tokenizer, eot_id)
    path = os.path.join(root, key)
    done, lock, failed = os.path.join(path, "stats.json"), path + ".lock", path + ".failed"
    waited, last_note = time.time(), 0.0
    while not os.path.isfile(done):
        if local_rank == 0:
            release = take_lock(lock)
            if release is not None:
                try:
                    if os.path.isfile(done):
                        break  # finished between our look and the lock
                    _clean_dead(root, key)
                    if os.path.exists(failed):
                        os.remove(failed)
                    log(f"data: preparing {key} in {root}")
                    stats = build(d, tokenizer, eot_id, path, log)
                    stats["cache"] = {"key": key, "path": path, "hit": False}
                    for line in data_warnings(stats):
                        log(line)
                    return (*load(path)[:3], stats, path)
                except BaseException as e:  # any failure: the job's other ranks wait for this file, never forever
                    known = _as_data_error(e, d, path)
                    if known is not None:
                        message = str(known)
                    elif isinstance(e, (KeyboardInterrupt, SystemExit)):  # a signal (SIGTERM before training, Ctrl-C)
                        message = f"preparing {path} was stopped on {socket.gethostname()} (a signal or Ctrl-C), not finished."
                    else:
                        message = (f"preparing {path} failed on {socket.gethostname()} ({_first_line(e)}); its traceback is in "
                                   "that process's output.")
                    try:  # whole or not at all: the ranks waiting read it as soon as it is there
                        with open(failed + ".tmp", "w") as f:
                            json.dump({"token": _job_token(), "message": message}, f)
                        os.replace(failed + ".tmp", failed)
                    except OSError:
                        pass  # (a full disk) what failed the build matters more
                    if known is None or known is e:
                        raise
                    raise known from None
                finally:
                    release()
        if os.path.isfile(failed):
            with open(failed) as f:
                info = json.load(f)
            if info.get("token") == _job_token():
                raise DataError(info["message"])
        if time.time() - last_note > 60:
            log(_waiting_note(lock, path, time.time() - waited, local_rank == 0))
            last_note = time.time()
        time.sleep(poll_s)
    train, evals, packs, stats = load(path)
    stats["cache"] = {"key": key, "path": path, "hit": True}
    if d.on_error == "strict" and (stats["validation"]["skipped"] or (stats.get("unrenderable") or {}).get("count")):
        _stop_as_strict(d, path, stats)
    for line in data_warnings(stats):
        log(line)
    return train, evals, packs, stats, path
