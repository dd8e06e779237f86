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
    jsonl(other, [conv(20 + i, f"other {i}", f"reply {i}") for i in range(2)])  # GOOD's content would be warned as overlap
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


# ---- review fixes: tokenization errors, strict after lenient, overlap, split, lock, warnings ----

ALTERNATE_ONLY = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate "
                  "user/assistant/user/assistant/...') }}{% endif %}" + TEMPLATES["chatml"])


def test_assistant_first_data_builds_and_a_record_the_template_refuses_is_named(tmp_path):
    """ABCD-style data (the agent greets first) builds with a tag-free real-model template; a record
    that the template itself refuses stops with its file:line and the reason, not a traceback."""
    from tests.test_labels import ASSISTANT_FIRST, LLAMA3, _untagged

    path = jsonl(tmp_path / "abcd.jsonl", [GOOD[0], {"id": "abcd-1", "messages": ASSISTANT_FIRST}])
    tok = _untagged(tmp_path, "llama3", LLAMA3)
    stats = build(dcfg(tmp_path, train_files=[path]), tok, end_of_turn_id(tok), str(tmp_path / "o1"))
    assert stats["train"]["conversations"] == 2
    tok, _ = _tok()
    tok.chat_template = ALTERNATE_ONLY
    for fast in (True, False):
        with pytest.raises(DataError) as e:
            build(dcfg(tmp_path, train_files=[path], fast_tokenization=fast), tok, end_of_turn_id(tok), str(tmp_path / "o2"))
        assert str(e.value) == (f"{path}:2: the chat template cannot tokenize this conversation (TemplateError: Conversation "
                                "roles must alternate user/assistant/user/assistant/...); fix or remove this record, or set "
                                "data.chat_template to a template that accepts it.")


def test_strict_run_stops_on_records_a_lenient_build_skipped(tmp_path):
    """data.on_error is not in the cache key (it does not change what a build keeps when nothing is
    wrong); a strict run that hits a lenient build's cache still stops with the errors a build gives."""
    tok, eot = _tok()
    path = jsonl(tmp_path / "a.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD) + BAD["unknown_role"][0] + "\n")
    lenient = prepare_cached(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, eot, log=lambda m: None)[3]
    assert lenient["validation"]["skipped"] == {"unknown_role": 1}
    with pytest.raises(DataError) as built:
        build(dcfg(tmp_path, train_files=[path]), tok, eot, str(tmp_path / "fresh"))
    with pytest.raises(DataError) as hit:
        prepare_cached(dcfg(tmp_path, train_files=[path]), tok, eot, log=lambda m: None)
    assert str(hit.value) == str(built.value) and str(hit.value).startswith(f"{path}:7: messages[0] has role 'customer'")
    assert prepare_cached(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, eot, log=lambda m: None)[3]["cache"]["hit"]


def test_eval_conversations_that_also_occur_in_training_are_warned(tmp_path):
    tok, eot = _tok()
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
    from data_pipeline.dataset import eval_conversations

    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "a.jsonl", [conv(i, f"q{i}", f"a{i}") for i in range(40)])
    monkeypatch.chdir(tmp_path / "sub")
    evals = []
    for k, spelling in enumerate([str(tmp_path / "a.jsonl"), "../a.jsonl", "../sub/../a.jsonl"]):
        build(dcfg(tmp_path, train_files=[spelling], eval_fraction=0.25), *_tok(), str(tmp_path / f"o{k}"))
        evals.append([c["messages"] for c in eval_conversations(str(tmp_path / f"o{k}"))])
    assert 4 <= len(evals[0]) <= 18 and evals[0] == evals[1] == evals[2]


def test_a_killed_build_does_not_block_the_next_prepare(tmp_path):
    """A build killed with SIGKILL (or OOM) holds no lock afterwards: the next prepare builds at
    once, without waiting, and removes the dead build's work folder."""
    import os
    import signal

    path = jsonl(tmp_path / "a.jsonl", GOOD)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        import data_pipeline.dataset as ds
        from tests.test_data import dcfg, _tok

        def stuck(d, report):  # the build is under way (lock taken, work folder made) and hangs
            print("BUILDING", flush=True)
            time.sleep(600)
            yield from ()

        ds._conversations = stuck
        ds.prepare_cached(dcfg(Path({str(tmp_path)!r}), train_files=[{path!r}]), *_tok(), log=lambda m: None)
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

    tok, eot = _tok()
    train, _, _, stats, _ = prepare_cached(dcfg(tmp_path, train_files=[path]), tok, eot, log=no_waiting)
    assert stats["cache"]["hit"] is False and len(train) == len(GOOD)
    assert not list(root.glob("dialtune-data-*")) and not list(root.glob("*.lock")) and not list(root.glob("*.part"))


def test_truncated_dropped_and_skipped_data_is_warned_on_build_and_hit(tmp_path):
    tok, eot = _tok()
    rows = GOOD + [{"id": f"long{i}", "messages": LONG} for i in range(2)]
    path = jsonl(tmp_path / "a.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in rows) + BAD["unknown_role"][0] + "\n")
    for policy, want in [("keep_recent", "warning: 2 of 8 conversations (25.0%) were truncated to data.max_seq_len=120 tokens "
                                         "(data.truncation=keep_recent), so their cut turns are not trained on; raise "
                                         "data.max_seq_len, or set data.truncation=drop to leave them out."),
                         ("drop", "warning: 2 of 8 conversations (25.0%) were dropped as longer than data.max_seq_len=120 "
                                  "tokens (data.truncation=drop); raise data.max_seq_len or use data.truncation=keep_recent.")]:
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


def test_truncation_warning_threshold():
    from data_pipeline.dataset import data_warnings

    def stats(truncated):
        return {"validation": {"records_read": 100, "records_kept": 100, "skipped": {}}, "max_seq_len": 512,
                "truncation": {"policy": "right", "truncated": truncated, "dropped": 0, "truncated_share": truncated / 100}}

    assert data_warnings(stats(10)) == [] and len(data_warnings(stats(11))) == 1


def test_prepare_cli_config_errors_are_one_sentence(capsys):
    from launch.prepare import main

    for override, want in [
        ("data.max_seq_len=abc", "dialtune: error: data.max_seq_len has an invalid value (Value 'abc' of type 'str' could not "
                                 "be converted to Integer); `dialtune config-doc` lists every key with its type."),
        ("data.max_seq_lenn=3", "dialtune: error: data.max_seq_lenn is not a config key (did you mean data.max_seq_len?); "
                                "`dialtune config-doc` lists them all."),
        ("+data.max_seq_lenn=3", "dialtune: error: data.max_seq_lenn is not a config key (did you mean data.max_seq_len?); "
                                 "`dialtune config-doc` lists them all."),
        ("data=nonexistent", "dialtune: error: cannot compose the config from data=nonexistent: In 'train': Could not find "
                             "'data/nonexistent' (Available options in 'data': customer_service, sample); check the override's "
                             "key, value and syntax (key=value)."),
    ]:
        assert main([override]) == 2
        assert capsys.readouterr().err.strip() == want


def test_direction_marks_count_as_empty_and_a_duplicate_id_names_the_first_copy(tmp_path):
    from collections import Counter

    from data_pipeline.validate import clean

    for blank in ("\u200e", "\u200f", " \u200e\u200f\n", "\u202a\u2066"):
        got = clean([{"role": U, "content": "q"}, {"role": A, "content": blank}], dcfg(tmp_path), Counter())
        assert got.reason == "empty_content", repr(blank)
    path = jsonl(tmp_path / "dup.jsonl", GOOD[:2] + GOOD[:1])
    with pytest.raises(DataError) as e:
        build(dcfg(tmp_path, train_files=[path]), *_tok(), str(tmp_path / "o"))
    assert str(e.value).splitlines()[0] == f"{path}:3: id 'c0' already appeared at {path}:1; remove one copy (or set data.duplicate_ids=keep)."


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    """Filesystems without flock (Lustre without -o flock) fall back to an O_EXCL file; its holder
    is taken over when it ran on this host and its pid is gone, and kept while it lives."""
    import errno
    import fcntl
    import os
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
