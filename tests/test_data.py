"""Data pipeline: formats, readers, each validation rule, policies, truncation, weights, cache,
prepare-once across processes, streaming, and `dialtune prepare`."""
import gzip
import json
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from data_pipeline.chat import IGNORE, DataError, TEMPLATES, encode, end_of_turn_id, tokenize_conversation, _tokenize_by_prefix
from data_pipeline.dataset import build, cache_key, prepare_cached
from data_pipeline.records import read_records, to_messages
from train.config import DataConfig
from tests.conftest import ROOT, run_env

U, A = "user", "assistant"


def dcfg(tmp_path, **kw):
    base = OmegaConf.structured(DataConfig)
    base.cache_dir = str(tmp_path / "cache")
    return OmegaConf.merge(base, kw)


def jsonl(path, rows, raw=None):
    text = raw if raw is not None else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def conv(i, *turns):
    roles = [U, A] * 10
    return {"id": f"c{i}", "messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


GOOD = [conv(i, f"question {i}", f"answer {i}") for i in range(6)]


# ---- formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rec,expected", [
    ({"messages": [{"role": U, "content": "hi"}, {"role": A, "content": "yo"}]}, [(U, "hi"), (A, "yo")]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, [(U, "hi"), (A, "yo")]),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "Customer", "value": "hi"}, {"from": "agent", "value": "yo"}]},
     [("system", "s"), (U, "hi"), (A, "yo")]),
    # `sys` as a first turn is a system prompt (ShareGPT); after a user turn, the agent (MultiWOZ usr/sys)
    ({"conversations": [{"from": "sys", "value": "s"}, {"from": "usr", "value": "hi"}, {"from": "sys", "value": "yo"}]},
     [("system", "s"), (U, "hi"), (A, "yo")]),
    ({"conversations": [{"from": "usr", "value": "hi"}, {"from": "sys", "value": "yo"}]}, [(U, "hi"), (A, "yo")]),
    ({"instruction": "Translate", "input": "chat", "output": "cat"}, [(U, "Translate\n\nchat"), (A, "cat")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [(U, "Say hi"), (A, "hi")]),
    ({"prompt": "2+2?", "completion": "4"}, [(U, "2+2?"), (A, "4")]),
])
def test_formats_convert_explicitly(rec, expected):
    msgs, _ = to_messages(rec, "auto")
    assert [(m["role"], m["content"]) for m in msgs] == expected


def test_intent_records_become_classification_conversations(tmp_path):
    d = dcfg(tmp_path)
    msgs, _ = to_messages({"text": "my card is lost", "label": "lost_card"}, "auto", d.intent)
    assert msgs[0]["role"] == "system" and "intent" in msgs[0]["content"]
    assert msgs[1:] == [{"role": U, "content": "my card is lost"}, {"role": A, "content": "lost_card"}]


def test_pinned_format_is_not_guessed():
    p = to_messages({"prompt": "a", "completion": "b"}, "messages")
    assert p.reason == "bad_type"
    assert to_messages({"foo": 1}, "auto").reason == "unknown_format"


def test_every_file_kind_reads_the_same(tmp_path):
    import pandas as pd
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    paths = [jsonl(tmp_path / "a.jsonl.gz", rows), str(tmp_path / "a.json"), str(tmp_path / "a.csv"),
             str(tmp_path / "a.parquet"), str(tmp_path / "ds")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for p in paths:
        got = [r for _, r in read_records(p)]
        assert got == rows, p
    wheres = [w for w, _ in read_records(paths[0])]
    assert wheres[1].endswith("a.jsonl.gz:2")


def test_reading_is_streaming(tmp_path):
    """The reader yields the first record before it has looked at the (broken) rest."""
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "x" * 10 + "\n")
    it = read_records(str(path))
    where, first = next(it)
    assert first == GOOD[0] and where.endswith(":1")


# ---- validation: one constructed file per failure kind ----------------------------------------

BAD = {
    "invalid_json": ('{"messages": [', "not valid JSON"),
    "null_value": ('{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}', "null content"),
    "missing_key": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "has no 'content'"),
    "bad_type": ('{"messages": "hello"}', "must be a list"),
    "unknown_role": ('{"messages": [{"role": "customer", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role 'customer'"),
    "empty_content": ('{"messages": [{"role": "user", "content": " \\u200b\\n"}, {"role": "assistant", "content": "a"}]}', "empty"),
    "system_not_first": ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}', "may only come first"),
    "no_assistant": ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}', "no assistant"),
    "unknown_format": ('{"foo": 1}', "no known conversation format"),
    "duplicate_id": (json.dumps(GOOD[0]), "already appeared"),
}



def test_a_line_cut_mid_string_is_called_unterminated():
    from data_pipeline.records import _parse_json

    cut = _parse_json('{"messages": [{"role": "user", "content": "wh\n')
    assert cut.message.startswith("not valid JSON (Unterminated string starting at column 43)"), cut.message

@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_rule_strict_names_file_and_line(tmp_path, reason):
    line, fragment = BAD[reason]
    path = jsonl(tmp_path / f"{reason}.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD[:2]) + line + "\n")
    with pytest.raises(DataError) as e:
        build(dcfg(tmp_path, train_files=[path]), *_tok(), str(tmp_path / "out"))
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{path}:3: ") and fragment in first, first


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_rule_lenient_skips_and_counts(tmp_path, reason):
    line, _ = BAD[reason]
    path = jsonl(tmp_path / f"{reason}.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD) + line + "\n")
    stats = build(dcfg(tmp_path, train_files=[path], on_error="lenient"), *_tok(), str(tmp_path / "out"))
    v = stats["validation"]
    assert v["skipped"] == {reason: 1} and v["records_kept"] == len(GOOD)
    assert v["skipped_examples"][reason] == [f"{path}:{len(GOOD) + 1}"]


def test_invalid_utf8_bom_and_utf16(tmp_path):
    good = "".join(json.dumps(r) + "\n" for r in GOOD)
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + good.encode() + b'{"messages": "\xff\xfe"}\n')  # BOM ok, bad bytes on line 7
    with pytest.raises(DataError, match=r"bytes.jsonl:7: invalid UTF-8 byte 0xff"):
        build(dcfg(tmp_path, train_files=[str(bad)]), *_tok(), str(tmp_path / "o1"))
    u16 = tmp_path / "u16.jsonl"
    u16.write_bytes(good.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        build(dcfg(tmp_path, train_files=[str(u16)]), *_tok(), str(tmp_path / "o2"))
    stats = build(dcfg(tmp_path, train_files=[str(u16)], utf16="convert"), *_tok(), str(tmp_path / "o3"))
    assert stats["train"]["conversations"] == len(GOOD)


@pytest.mark.parametrize("policy,rec,outcome", [
    (dict(trailing_user="trim"), conv(0, "q", "a", "q2"), [(U, "q"), (A, "a")]),
    (dict(trailing_user="reject"), conv(0, "q", "a", "q2"), "trailing_user"),
    (dict(same_role="merge"), {"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}, {"role": A, "content": "c"}]}, [(U, "a\nb"), (A, "c")]),
    (dict(same_role="reject"), {"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}, {"role": A, "content": "c"}]}, "consecutive_same_role"),
    (dict(long_message="truncate", max_message_chars=5), conv(0, "q", "abcdefghij"), [(U, "q"), (A, "abcde")]),
    (dict(long_message="drop", max_message_chars=5), conv(0, "q", "abcdefghij"), "message_too_long"),
])
def test_repair_policies(tmp_path, policy, rec, outcome):
    from data_pipeline.validate import clean
    from collections import Counter

    d = dcfg(tmp_path, **policy)
    got = clean(rec["messages"], d, Counter())
    if isinstance(outcome, str):
        assert got.reason == outcome
    else:
        assert [(m["role"], m["content"]) for m in got] == outcome


def test_empty_result_is_an_error(tmp_path):
    path = jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": U, "content": "q"}]}])
    with pytest.raises(DataError, match="no usable conversation"):
        build(dcfg(tmp_path, train_files=[path], on_error="lenient"), *_tok(), str(tmp_path / "o"))


def test_system_prompt_per_source(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD[:4])
    d = dcfg(tmp_path, sources=[{"path": path, "system_prompt": "You are Acme support."}])
    build(d, *_tok(), str(tmp_path / "o"))
    from datasets import load_from_disk

    tok = _tok()[0]
    text = tok.decode(load_from_disk(str(tmp_path / "o" / "train"))[0]["input_ids"])
    assert text.startswith("<|bos|><|im_start|>system\nYou are Acme support.<|im_end|>")


# ---- tokenization, templates, truncation -----------------------------------------------------

def _tok():
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return tok, end_of_turn_id(tok)


LONG = [{"role": U if i % 2 == 0 else A, "content": f"turn {i} " + "word " * 30} for i in range(10)]


def test_keep_recent_truncation_keeps_an_assistant_target(tokenizer):
    eot = end_of_turn_id(tokenizer)
    full, _, _ = encode(tokenizer, LONG, eot, 10_000)
    ids, labels, outcome = encode(tokenizer, LONG, eot, len(full) // 2, "keep_recent")
    assert outcome == "truncated" and len(ids) <= len(full) // 2
    text = tokenizer.decode(ids)
    assert "turn 9" in text and "turn 0" not in text  # oldest turns went first
    assert text.count("<|im_start|>user") >= 1 and any(l != IGNORE for l in labels)
    assert encode(tokenizer, LONG, eot, len(full) // 2, "drop")[2] == "dropped"
    r_ids, _, r_out = encode(tokenizer, LONG, eot, 120, "right")
    assert r_out == "truncated" and r_ids == full[:120]
    assert encode(tokenizer, LONG, eot, 20, "right")[2] == "dropped"  # no assistant token left


def test_last_turn_only(tokenizer):
    eot = end_of_turn_id(tokenizer)
    ids, labels, _ = encode(tokenizer, LONG[:4], eot, 10_000, last_turn_only=True)
    assert tokenizer.decode([t for t in labels if t != IGNORE]).startswith("turn 3")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_named_templates_label_per_token_like_transformers(tokenizer, name):
    """Labels equal transformers' own assistant-token mask, per token, for each shipped template."""
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = TEMPLATES[name]
    eot = end_of_turn_id(tok)
    msgs = [{"role": "system", "content": "Be brief."}] + LONG[:4]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = tokenize_conversation(tok, msgs, eot)
    assert ids == list(out["input_ids"])
    assert [l != IGNORE for l in labels] == [bool(m) for m in out["assistant_masks"]]
    assert ids.count(tok.bos_token_id) <= 1
    # the prefix-render fallback (for templates without generation tags) agrees
    assert _tokenize_by_prefix(tok, msgs, eot) == (ids, labels)
    closing = {"chatml": "<|im_end|>", "qwen2": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral": tok.eos_token}[name]
    assert tok.convert_ids_to_tokens(eot) == closing and eot in [t for t in labels if t != IGNORE]


# ---- weights, cache, prepare-once ------------------------------------------------------------

def test_source_weights(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", GOOD[:4])
    b = jsonl(tmp_path / "b.jsonl", [conv(10 + i, f"x{i}", f"y{i}") for i in range(4)])
    d = dcfg(tmp_path, sources=[{"path": a, "weight": 2.0}, {"path": b, "weight": 0.5}])
    stats = build(d, *_tok(), str(tmp_path / "o"))
    assert stats["train"]["sources"][a]["conversations"] == 8
    assert stats["train"]["sources"][b]["conversations"] == 2
    assert build(d, *_tok(), str(tmp_path / "o2"))["train"] == stats["train"]  # deterministic


def test_eval_carved_deterministically(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [conv(i, f"q{i}", f"a{i}") for i in range(40)])
    s1 = build(dcfg(tmp_path, train_files=[path], eval_fraction=0.25), *_tok(), str(tmp_path / "o1"))
    s2 = build(dcfg(tmp_path, train_files=[path], eval_fraction=0.25), *_tok(), str(tmp_path / "o2"))
    assert s1["train"]["conversations"] + s1["eval"]["conversations"] == 40
    assert 4 <= s1["eval"]["conversations"] <= 18 and s1["eval"] == s2["eval"]



def test_an_eval_file_that_is_also_trained_on_is_flagged(tmp_path):
    tok, eot = _tok()
    path = tmp_path / "a.jsonl"
    jsonl(path, GOOD)
    said = []
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[str(tmp_path / "." / "a.jsonl")]), tok, eot, log=said.append)
    assert any(m.startswith("warning: held-out file") and "in-sample" in m for m in said), said
    said.clear()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    prepare_cached(dcfg(tmp_path, train_files=[str(path), str(empty)]), tok, eot, log=said.append)
    assert f"warning: {empty} holds no records" in said, said  # beside a good file: trained on the rest, said so
    said.clear()
    other = tmp_path / "b.jsonl"
    jsonl(other, GOOD[:2])
    prepare_cached(dcfg(tmp_path, train_files=[str(path)], eval_files=[str(other)]), tok, eot, log=said.append)
    assert not any("in-sample" in m for m in said)


def test_no_training_conversation_left_says_why_and_names_the_file(tmp_path):
    from data_pipeline.chat import DataError

    tok, eot = _tok()
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

def test_cache_hits_and_misses(tmp_path):
    tok, eot = _tok()
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
    assert cache_key(d, tok, eot) != cache_key(d, *_tok())


def test_prepare_once_across_processes(tmp_path):
    """Two processes share one cache dir (as two nodes on shared storage would): exactly one
    builds, the other waits on the filesystem and reads the same result."""
    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(ROOT)!r})
        from omegaconf import OmegaConf
        from tests.test_data import dcfg, _tok
        from data_pipeline.dataset import prepare_cached
        from pathlib import Path
        d = dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}])
        train, _, _, stats, where = prepare_cached(d, *_tok(), local_rank=0, log=lambda m: print("LOG", m), poll_s=0.2)
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


# ---- dialtune prepare --------------------------------------------------------------------------

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
