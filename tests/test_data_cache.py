"""Data pipeline, the prepared side: source weights, the eval split (carved, overlapping, any
spelling of a path), the cache (hits, misses, warnings on a hit), prepare-once across processes
and its lock (a killed build, no flock), and `dialtune prepare`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from data_pipeline.chat import TEMPLATES, DataError
from data_pipeline.cache import cache_key, prepare_cached
from data_pipeline.dataset import build
from tests.conftest import ROOT, run_env
from tests.data_helpers import BAD, GOOD, LONG, conv, dcfg, jsonl, tiny_tok


def test_source_weights(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", GOOD[:4])
    b = jsonl(tmp_path / "b.jsonl", [conv(10 + i, f"x{i}", f"y{i}") for i in range(4)])
    d = dcfg(tmp_path, sources=[{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}])
    stats = build(d, *tiny_tok(), str(tmp_path / "o"))
    assert stats["train"]["sources"][a]["conversations"] == 8
    assert stats["train"]["sources"][b]["conversations"] == 2
    assert build(d, *tiny_tok(), str(tmp_path / "o2"))["train"] == stats["train"]  # deterministic


def test_truncation_is_counted_over_the_weighted_set_and_a_source_weighted_to_nothing_is_warned(tmp_path):
    """The truncated share is that of the sets as built (a long source weighted 3 counts thrice), a
    reply cut inside its turn is counted apart, a weight that draws none of a source says so, and a
    weight on a held-out source is refused."""
    from data_pipeline.dataset import data_warnings
    from launch.prepare import report_text
    from train.config import ConfigError
    from train.validate import validate_data

    long = jsonl(tmp_path / "long.jsonl", [{"id": f"l{i}", "messages": LONG} for i in range(2)])
    short = jsonl(tmp_path / "short.jsonl", GOOD)
    few = jsonl(tmp_path / "few.jsonl", [conv(40 + i, f"p{i}", f"q{i}") for i in range(3)])
    d = dcfg(tmp_path, max_seq_len=200, sources=[{"path": long, "weight": 3.0}, {"path": short}, {"path": few, "weight": 0.1}])
    stats = build(d, *tiny_tok(), str(tmp_path / "o"))
    t = stats["truncation"]
    assert (t["truncated"], t["built"], t["cut"]) == (6, 12, 0) and t["truncated_share"] == 0.5  # (2 of 11 records read)
    said = data_warnings(stats)
    assert said[0].startswith("warning: 6 of 12 conversations (50.0%) in the training set (after the sources' weights) "
                              "and the held-out set were truncated"), said
    assert said[1] == (f"warning: data.sources weight 0.1 draws none of the 3 training conversations of {few}; raise its "
                       "weight to at least 0.17, or remove the source."), said
    assert f"  {few}: 0 conversations, 0 tokens (weight 0.1 of 3)" in report_text(stats)
    d = dcfg(tmp_path, max_seq_len=120, train_files=[long])  # not even the last user turn and its reply (144 tokens) fit
    t = build(d, *tiny_tok(), str(tmp_path / "o2"))["truncation"]
    assert (t["truncated"], t["cut"]) == (2, 2) and "2 of them cut inside a turn" in data_warnings({**stats, "truncation": t})[0]
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight=2.0: weights mix the training data only"):
        validate_data(dcfg(tmp_path, sources=[{"path": short, "split": "eval", "weight": 2}], train_files=[long]))


def test_glob_patterns_name_every_file_they_match(tmp_path):
    """data.train_files / eval_files / sources[].path take glob patterns: each matched file is a
    source with the pattern's settings; a pattern that matches nothing is one sentence."""
    from train.config import ConfigError
    from train.validate import validate_data

    (tmp_path / "shards").mkdir()
    a = jsonl(tmp_path / "shards" / "part-0.jsonl", GOOD[:4])
    b = jsonl(tmp_path / "shards" / "part-1.jsonl", [conv(10 + i, f"x{i}", f"y{i}") for i in range(4)])
    (tmp_path / "more" / "deep").mkdir(parents=True)
    c = jsonl(tmp_path / "more" / "deep" / "extra.jsonl", [conv(30 + i, f"u{i}", f"v{i}") for i in range(3)])
    jsonl(tmp_path / "held.jsonl", [conv(20 + i, f"z{i}", f"w{i}") for i in range(2)])
    d = dcfg(tmp_path, train_files=[str(tmp_path / "shards" / "part-*.jsonl")], eval_files=[str(tmp_path / "he?d.jsonl")],
             sources=[{"path": str(tmp_path / "more" / "**" / "*.jsonl"), "weight": 2.0}])
    validate_data(d)
    stats = build(d, *tiny_tok(), str(tmp_path / "o"))
    assert {p: s["conversations"] for p, s in stats["train"]["sources"].items()} == {a: 4, b: 4, c: 6}  # c at weight 2
    assert stats["eval"]["conversations"] == 2
    from data_pipeline.records import expand_pattern

    assert expand_pattern(str(tmp_path / "more" / "**")) == [c]  # files only, not the folders `**` passes through
    with pytest.raises(ConfigError, match=r"data.train_files\[1\]: the pattern '\S+/nope-\*.jsonl' matches no file; check it"):
        validate_data(dcfg(tmp_path, train_files=[a, str(tmp_path / "nope-*.jsonl")]))
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: the pattern '\S+' matches no file; check it"):
        validate_data(dcfg(tmp_path, sources=[{"path": str(tmp_path / "x*.jsonl")}]))


def test_eval_carved_deterministically(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [conv(i, f"q{i}", f"a{i}") for i in range(40)])
    s1 = build(dcfg(tmp_path, train_files=[path], eval_fraction=0.25), *tiny_tok(), str(tmp_path / "o1"))
    s2 = build(dcfg(tmp_path, train_files=[path], eval_fraction=0.25), *tiny_tok(), str(tmp_path / "o2"))
    assert s1["train"]["conversations"] + s1["eval"]["conversations"] == 40
    assert 4 <= s1["eval"]["conversations"] <= 18 and s1["eval"] == s2["eval"]


def test_an_eval_file_that_is_also_trained_on_is_flagged(tmp_path):
    tok, eot = tiny_tok()
    path = tmp_path / "a.jsonl"
    jsonl(path, GOOD)
    said = []
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[str(tmp_path / "." / "a.jsonl")]), tok, eot, log=said.append)
    assert any(m.startswith("warning: held-out file") and "in-sample" in m for m in said), said
    said.clear()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    prepare_cached(dcfg(tmp_path, train_files=[str(path), str(empty)]), tok, eot, log=said.append)
    assert f"warning: {empty} gives the training set no conversation (it holds no records); fix the file, or remove it from " \
        "the data config." in said, said  # beside a good file: trained on the rest, said so
    said.clear()
    other = tmp_path / "b.jsonl"
    jsonl(other, [conv(20 + i, f"other {i}", f"reply {i}") for i in range(2)])  # GOOD's content would be warned as overlap
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[str(other)]), tok, eot, log=said.append)
    assert not any("in-sample" in m for m in said)


def test_training_on_your_data_against_the_samples_held_out_set_is_warned(tmp_path):
    """data.train_files=[yours] leaves the default data=sample's eval file in place: the eval loss
    would measure the bundled sample, so every prepare says so (and not when both are the sample's)."""
    from data_pipeline.records import SAMPLE_DATA

    tok, eot = tiny_tok()
    path = jsonl(tmp_path / "a.jsonl", GOOD)
    sample_eval = str(SAMPLE_DATA / "eval.jsonl")
    said = []
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[sample_eval]), tok, eot, log=said.append)
    assert any(m.startswith(f"warning: the held-out set holds the bundled sample's {sample_eval} (data=sample") and "data.eval_files=[" in m
               for m in said), said
    said.clear()
    other = jsonl(tmp_path / "b.jsonl", [conv(20 + i, f"other {i}", f"reply {i}") for i in range(2)])
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[str(other), sample_eval]), tok, eot, log=said.append)
    assert any(f"the held-out set holds the bundled sample's {sample_eval}" in m for m in said), said  # beside yours too
    said.clear()
    prepare_cached(dcfg(tmp_path, train_files=[str(SAMPLE_DATA / "train.jsonl")], eval_files=[sample_eval]), tok, eot,
                   log=said.append)
    assert not any("bundled sample" in m for m in said), said


def test_no_training_conversation_left_says_why_and_names_the_file(tmp_path):

    tok, eot = tiny_tok()
    held_out = jsonl(tmp_path / "eval.jsonl", GOOD)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"no training conversation in {empty}: no usable record \(an empty file"):
        prepare_cached(dcfg(tmp_path, train_files=[str(empty)], eval_files=[held_out]), tok, eot, log=lambda m: None)
    long = jsonl(tmp_path / "long.jsonl", [conv(i, "word " * 80, "answer " * 80) for i in range(3)])
    with pytest.raises(DataError, match=rf"no training conversation in {long}: all 3 that passed validation are longer than "
                                        r"data.max_seq_len=64 and were dropped \(data.truncation=drop\); raise data.max_seq_len or use"):
        prepare_cached(dcfg(tmp_path, train_files=[long], eval_files=[held_out], max_seq_len=64, truncation="drop"),
                       tok, eot, log=lambda m: None)


def test_an_asked_for_held_out_set_that_comes_out_empty_is_an_error(tmp_path):
    """Held-out files of which nothing is usable (all too long, or empty), or an eval_fraction that
    draws nothing, would train without any eval loss; each is one sentence naming what asked."""
    tok, eot = tiny_tok()
    train = jsonl(tmp_path / "train.jsonl", GOOD)
    long = jsonl(tmp_path / "long.jsonl", [conv(i, "word " * 80, "answer " * 80) for i in range(3)])
    with pytest.raises(DataError, match=rf"{long} gave no held-out conversation: all 3 are longer than data.max_seq_len=64 and "
                                        r"were dropped; .*or train without a held-out loss: data.eval_files=\[\] and data"):
        prepare_cached(dcfg(tmp_path, train_files=[train], eval_files=[long], max_seq_len=64, truncation="drop"),
                       tok, eot, log=lambda m: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"{empty} gave no held-out conversation: no usable record"):
        prepare_cached(dcfg(tmp_path, train_files=[train], eval_files=[str(empty)]), tok, eot, log=lambda m: None)
    with pytest.raises(DataError, match=rf"data.eval_fraction=1e-09 gave no held-out conversation: it drew none of the {len(GOOD)} "):
        prepare_cached(dcfg(tmp_path, train_files=[train], eval_fraction=1e-9), tok, eot, log=lambda m: None)


def test_cache_hits_and_misses(tmp_path):
    tok, eot = tiny_tok()
    path = tmp_path / "a.jsonl"
    jsonl(path, GOOD)
    d = dcfg(tmp_path, train_files=[str(path)])
    assert prepare_cached(d, tok, eot)[3]["cache"]["hit"] is False
    train, _, _, stats, where = prepare_cached(d, tok, eot)
    assert stats["cache"]["hit"] is True and len(train) == len(GOOD)
    assert train.cache_files  # memory-mapped Arrow on disk, not an in-memory table
    key = cache_key(d, tok, eot)
    jsonl(path, GOOD[:-1])  # content changed
    assert cache_key(d, tok, eot) != key and prepare_cached(d, tok, eot)[3]["cache"]["hit"] is False
    assert cache_key(dcfg(tmp_path, train_files=[str(path)], max_seq_len=100), tok, eot) != cache_key(d, tok, eot)
    tok.chat_template = TEMPLATES["qwen2"]
    assert cache_key(d, tok, eot) != cache_key(d, *tiny_tok())


def test_prepare_once_across_processes(tmp_path):
    """Two processes share one cache dir (as two nodes on shared storage would): exactly one
    builds, the other waits on the filesystem and reads the same result."""
    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(ROOT)!r})
        from omegaconf import OmegaConf
        from tests.data_helpers import dcfg, tiny_tok
        from data_pipeline.cache import prepare_cached
        from pathlib import Path
        d = dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}])
        train, _, _, stats, where = prepare_cached(d, *tiny_tok(), local_rank=0, log=lambda m: print("LOG", m), poll_s=0.2)
        print("RESULT", json.dumps({{"n": len(train), "hit": stats["cache"]["hit"], "where": where}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=run_env(1), stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.split("RESULT ", 1)[1]) for o in outs]
    assert sum("preparing" in o for o in outs) == 1
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["n"] == results[1]["n"] == len(GOOD) and results[0]["where"] == results[1]["where"]


def _prepare(tmp_path, *overrides):
    return subprocess.run([sys.executable, "-m", "launch.cli", "prepare", f"data.cache_dir={tmp_path / 'c'}", *overrides],
                          env=run_env(), capture_output=True, text=True, cwd=str(ROOT), timeout=300)


def test_prepare_cli_on_bundled_data(tmp_path):
    p = _prepare(tmp_path, "data.packing=true")
    assert p.returncode == 0, p.stderr
    assert "train: 307 conversations" in p.stdout and "fill ratio" in p.stdout and "cache written" in p.stdout
    assert "cache hit" in _prepare(tmp_path, "data.packing=true").stdout


def test_prepare_cli_bad_data(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", None, raw=json.dumps(GOOD[0]) + "\n" + BAD["unknown_role"][0] + "\n")
    p = _prepare(tmp_path, f"data.train_files=[{path}]", "data.eval_files=[]")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"dialtune: error: {path}:2: messages[0] has role 'customer'" in p.stderr
    p = _prepare(tmp_path, f"data.train_files=[{path}]", "data.eval_files=[]", "data.on_error=lenient")
    assert p.returncode == 0 and "unknown_role" in p.stderr and "kept 1" in p.stdout


def test_eval_conversations_that_also_occur_in_training_are_warned(tmp_path):
    tok, eot = tiny_tok()
    train = jsonl(tmp_path / "train.jsonl", GOOD)
    copy = [conv(90, "question 0  ", "answer\n0"), GOOD[1], conv(91, "something", "new")]  # 2 copies, spelled apart
    held = jsonl(tmp_path / "held.jsonl", copy)
    said = []
    d = dcfg(tmp_path, train_files=[train], eval_files=[held])
    stats = prepare_cached(d, tok, eot, log=said.append)[3]
    want = (f"warning: 2 of 3 eval conversations also occur in training (eval: {held}; train: {train}), so the eval loss "
            "on them is in-sample; remove them from one side.")
    assert want in said and stats["overlap"]["eval_in_train"] == 2
    said.clear()
    assert prepare_cached(d, tok, eot, log=said.append)[3]["cache"]["hit"] and want in said  # said on a hit too
    said.clear()
    prepare_cached(dcfg(tmp_path, train_files=[train], eval_files=[jsonl(tmp_path / "other.jsonl", copy[2:])]), tok, eot,
                   log=said.append)
    assert not any("also occur in training" in m for m in said), said


def test_eval_split_is_the_same_under_any_spelling_of_the_path(tmp_path, monkeypatch):
    from data_pipeline.cache import eval_conversations

    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "a.jsonl", [conv(i, f"q{i}", f"a{i}") for i in range(40)])
    monkeypatch.chdir(tmp_path / "sub")
    evals = []
    for k, spelling in enumerate([str(tmp_path / "a.jsonl"), "../a.jsonl", "../sub/../a.jsonl"]):
        build(dcfg(tmp_path, train_files=[spelling], eval_fraction=0.25), *tiny_tok(), str(tmp_path / f"o{k}"))
        evals.append([c["messages"] for c in eval_conversations(str(tmp_path / f"o{k}"))])
    assert 4 <= len(evals[0]) <= 18 and evals[0] == evals[1] == evals[2]


def test_a_killed_build_does_not_block_the_next_prepare(tmp_path):
    """A build killed with SIGKILL (or OOM) holds no lock afterwards: the next prepare builds at
    once, without waiting, and removes the dead build's work folder."""
    import signal

    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import data_pipeline.dataset as ds
        from data_pipeline.cache import prepare_cached
        from tests.data_helpers import dcfg, tiny_tok

        def stuck(d, report):  # the build is under way (lock taken, work folder made) and hangs
            print("BUILDING", flush=True)
            time.sleep(600)
            yield from ()

        ds.validated_conversations = stuck
        prepare_cached(dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}]), *tiny_tok(), log=lambda m: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=run_env(1), stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert proc.stdout.readline().strip() == "BUILDING"
        root = tmp_path / "cache"
        locks = list(root.glob("*.lock"))
        assert len(locks) == 1 and list(root.glob("dialtune-data-*"))
        umask = os.umask(0)
        os.umask(umask)
        assert locks[0].stat().st_mode & 0o777 == 0o666 & ~umask
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()

    def no_waiting(message):
        assert "waiting for" not in message, message

    tok, eot = tiny_tok()
    train, _, _, stats, _ = prepare_cached(dcfg(tmp_path, train_files=[path]), tok, eot, log=no_waiting)
    assert stats["cache"]["hit"] is False and len(train) == len(GOOD)
    assert not list(root.glob("dialtune-data-*")) and not list(root.glob("*.lock")) and not list(root.glob("*.part"))


def test_truncated_dropped_and_skipped_data_is_warned_on_build_and_hit(tmp_path):
    tok, eot = tiny_tok()
    rows = GOOD + [{"id": f"long{i}", "messages": LONG} for i in range(2)]
    path = jsonl(tmp_path / "a.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in rows) + BAD["unknown_role"][0] + "\n")
    for policy, want in [("keep_recent", "warning: 2 of 8 conversations (25.0%) were truncated to data.max_seq_len=120 tokens "
                                         "(data.truncation=keep_recent; 2 of them cut inside a turn, as not even their last user "
                                         "turn and reply fit), so the turns cut from them count in neither training nor the held-out loss; raise "
                                         "data.max_seq_len, or set data.truncation=drop to leave them out."),
                         ("drop", "warning: 2 of 8 conversations (25.0%) were dropped as longer than data.max_seq_len=120 "
                                  f"tokens (data.truncation=drop; at {path}:7, {path}:8); raise data.max_seq_len or use "
                                  "data.truncation=keep_recent.")]:
        d = dcfg(tmp_path, train_files=[path], on_error="lenient", max_seq_len=120, truncation=policy)
        for hit in (False, True):
            said = []
            assert prepare_cached(d, tok, eot, log=said.append)[3]["cache"]["hit"] is hit
            assert want in said, said
            assert ("warning: 1 of 9 records (11.1%) were skipped as invalid (1 unknown_role; data.on_error=lenient); fix "
                    "them, or run with data.on_error=strict to list each with file:line.") in said
    said = []
    prepare_cached(dcfg(tmp_path, train_files=[jsonl(tmp_path / "good.jsonl", GOOD)]), tok, eot, log=said.append)
    assert not [m for m in said if m.startswith("warning")], said


def test_prepare_cli_config_errors_are_one_sentence(capsys):
    from launch.prepare import main

    for override, want in [
        ("data.max_seq_len=abc", "dialtune: error: data.max_seq_len has an invalid value (Value 'abc' of type 'str' could not "
                                 "be converted to Integer); `dialtune config-doc` lists every key with its type."),
        ("data.max_seq_lenn=3", "dialtune: error: data.max_seq_lenn is not a config key (did you mean data.max_seq_len?); "
                                "`dialtune config-doc` lists them all."),
        ("+data.max_seq_lenn=3", "dialtune: error: data.max_seq_lenn is not a config key (did you mean data.max_seq_len?); "
                                 "`dialtune config-doc` lists them all."),
        ("data.sources=[{path: a.jsonl, wieght: 2}]", "dialtune: error: data.sources=[{path: a.jsonl, wieght: 2}]: wieght is not "
                                                       "a field of a list item here (did you mean weight?); `dialtune config-doc` lists them all."),
        ("data=nonexistent", "dialtune: error: cannot compose the config from data=nonexistent: In 'train': Could not find "
                             "'data/nonexistent' (Available options in 'data': custom, customer_service, sample); check the override's "
                             "key, value and syntax (key=value)."),
        ("data.packing=2", "dialtune: error: data.packing=2 is not a boolean: use true or false."),  # (OmegaConf: true)
        # the override that holds the bad value, not every override of the command line
        (["run.root=/tmp", "optim.betas=[0.9,abc]"], "dialtune: error: optim.betas=[0.9,abc]: optim.betas[1] has an invalid value "
                                                     "(Value 'abc' of type 'str' could not be converted to Float); `dialtune "
                                                     "config-doc` lists every key with its type."),
    ]:
        assert main([override] if isinstance(override, str) else override) == 2
        assert capsys.readouterr().err.strip() == want


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    """Filesystems without flock (Lustre without -o flock) fall back to an O_EXCL file; its holder
    is taken over when it ran on this host and its pid is gone, and kept while it lives."""
    import errno
    import fcntl
    import socket

    from data_pipeline import cache_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = str(tmp_path / "k.lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "k.lock.excl").write_text(f"{socket.gethostname()} pid {dead} since then\n")
    release = cache_lock.take_lock(lock)
    assert release is not None and f"pid {os.getpid()} " in (tmp_path / "k.lock.excl").read_text()
    assert cache_lock.take_lock(lock) is None  # held by a live process (this one)
    release()
    assert not (tmp_path / "k.lock.excl").exists()


def test_a_failed_build_of_another_job_is_not_this_ones(monkeypatch):
    """The .failed note of a build names its job; torchrun without an rdzv id sets the run id "none" in
    every job, so that alone would make an old job's failure any later job's."""
    from data_pipeline.cache import _job_token

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    first = _job_token()
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert _job_token() != first and first != "none"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert _job_token() == "job-7"
