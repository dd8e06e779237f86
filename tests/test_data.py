"""Data pipeline: formats, readers, each validation rule, policies, truncation, streaming and
templates. (Weights, the eval split, the cache, prepare-once across processes and `dialtune
prepare`: test_data_cache.py.)"""
import json

import pytest

from data_pipeline.chat import IGNORE, DataError, TEMPLATES, encode, end_of_turn_id, tokenize_conversation, _tokenize_by_prefix
from data_pipeline.cache import prepare_cached
from data_pipeline.dataset import build, data_warnings
from data_pipeline.records import read_records, to_messages
from tests.data_helpers import A, BAD, GOOD, LONG, U, conv, dcfg, jsonl, tiny_tok


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


def test_pinned_format_is_not_guessed_and_a_mismatch_names_the_pin():
    p = to_messages({"prompt": "a", "completion": "b"}, "messages")
    assert p.reason == "unknown_format" and p.message == (
        "the format is pinned to messages (data.format, or the source's format), whose records have messages, but this one "
        "has prompt/completion (prompt_completion): set the format to auto or prompt_completion")
    assert to_messages({"messages": "hello"}, "messages").reason == "bad_type"  # its own key, badly typed
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


def test_a_json_file_that_holds_json_lines_is_named_as_such(tmp_path):
    lines = tmp_path / "a.json"
    lines.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n")
    with pytest.raises(DataError, match=rf"^{lines}:2: not valid JSON \(Extra data at column 1\); a .json file must hold one JSON array of "
                                        r"records; it reads as one JSON object per line: that is JSON Lines, name the file .jsonl.$"):
        list(read_records(str(lines)))
    broken = tmp_path / "b.json"
    broken.write_text('[{"prompt": "p", ')
    with pytest.raises(DataError, match=r"a .json file must hold one JSON array of records.$"):  # no JSON Lines hint
        list(read_records(str(broken)))


def test_the_bundled_sample_is_known_by_its_folder_even_as_links(tmp_path, monkeypatch):
    """git-annex / DVC keep a file as a link into their store: the sample is still the sample."""
    from data_pipeline import records

    sample, store = tmp_path / "sample_data", tmp_path / "store"
    sample.mkdir()
    store.mkdir()
    (store / "object").write_text("{}")
    (sample / "train.jsonl").symlink_to(store / "object")
    monkeypatch.setattr(records, "SAMPLE_DATA", sample.resolve())
    assert records.is_bundled_sample(str(sample / "train.jsonl")) and not records.is_bundled_sample(str(store / "object"))


def test_a_gz_name_on_a_plain_file_says_so(tmp_path):
    fake = tmp_path / "a.jsonl.gz"
    fake.write_text(json.dumps(GOOD[0]) + "\n")
    with pytest.raises(DataError, match=rf"^{fake}: not gzip-compressed, though its name ends in .gz; rename it without .gz"):
        list(read_records(str(fake)))


def test_reading_is_streaming(tmp_path):
    """The reader yields the first record before it has looked at the (broken) rest."""
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "x" * 10 + "\n")
    it = read_records(str(path))
    where, first = next(it)
    assert first == GOOD[0] and where.endswith(":1")


# ---- validation: one constructed file per failure kind ----------------------------------------


def test_content_parts_and_a_broken_json_array_are_named_plainly(tmp_path):
    from collections import Counter

    from data_pipeline.validate import clean

    parts = clean([{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}],
                  dcfg(tmp_path), Counter())
    assert parts.reason == "bad_type" and parts.message.startswith(
        "messages[0] 'content' must be text, got list (content parts such as [{'type': 'text', 'text': ...}] are not read")
    broken = tmp_path / "a.json"
    broken.write_text('[{"messages": [{"role": "user", "content": "tab\there"}]}]')  # a raw tab inside a string
    with pytest.raises(DataError, match=rf"^{broken}:1: not valid JSON \(Invalid control character at column 48\); a .json file"):
        list(read_records(str(broken)))


def test_a_line_cut_mid_string_is_called_unterminated():
    from data_pipeline.records import _parse_json

    cut = _parse_json('{"messages": [{"role": "user", "content": "wh\n')
    assert cut.message.startswith("not valid JSON (Unterminated string starting at column 43)"), cut.message

@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_rule_strict_names_file_and_line(tmp_path, reason):
    line, fragment = BAD[reason]
    path = jsonl(tmp_path / f"{reason}.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD[:2]) + line + "\n")
    with pytest.raises(DataError) as e:
        build(dcfg(tmp_path, train_files=[path]), *tiny_tok(), str(tmp_path / "out"))
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{path}:3: ") and fragment in first, first


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_rule_lenient_skips_and_counts(tmp_path, reason):
    line, _ = BAD[reason]
    path = jsonl(tmp_path / f"{reason}.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD) + line + "\n")
    stats = build(dcfg(tmp_path, train_files=[path], on_error="lenient"), *tiny_tok(), str(tmp_path / "out"))
    v = stats["validation"]
    assert v["skipped"] == {reason: 1} and v["records_kept"] == len(GOOD)
    assert v["skipped_examples"][reason] == [f"{path}:{len(GOOD) + 1}"]


def test_invalid_utf8_bom_and_utf16(tmp_path):
    good = "".join(json.dumps(r) + "\n" for r in GOOD)
    bad = tmp_path / "bytes.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + good.encode() + b'{"messages": "\xff\xfe"}\n')  # BOM ok, bad bytes on line 7
    with pytest.raises(DataError, match=r"bytes.jsonl:7: invalid UTF-8 byte 0xff"):
        build(dcfg(tmp_path, train_files=[str(bad)]), *tiny_tok(), str(tmp_path / "o1"))
    u16 = tmp_path / "u16.jsonl"
    u16.write_bytes(good.encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        build(dcfg(tmp_path, train_files=[str(u16)]), *tiny_tok(), str(tmp_path / "o2"))
    stats = build(dcfg(tmp_path, train_files=[str(u16)], utf16="convert"), *tiny_tok(), str(tmp_path / "o3"))
    assert stats["train"]["conversations"] == len(GOOD)


@pytest.mark.parametrize("policy,rec,outcome", [
    (dict(trailing_user="trim"), conv(0, "q", "a", "q2"), [(U, "q"), (A, "a")]),
    (dict(trailing_user="reject"), conv(0, "q", "a", "q2"), "trailing_user"),
    (dict(same_role="merge"), {"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}, {"role": A, "content": "c"}]}, [(U, "a\nb"), (A, "c")]),
    (dict(same_role="reject"), {"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}, {"role": A, "content": "c"}]}, "consecutive_same_role"),
    (dict(long_message="truncate", max_message_chars=5), conv(0, "q", "abcdefghij"), [(U, "q"), (A, "abcde")]),
    (dict(long_message="drop", max_message_chars=5), conv(0, "q", "abcdefghij"), "message_too_long"),
    (dict(), conv(0, "  q", "\n  What kind"), [(U, "  q"), (A, "What kind")]),  # (a reply's leading whitespace goes)
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
        build(dcfg(tmp_path, train_files=[path], on_error="lenient"), *tiny_tok(), str(tmp_path / "o"))


def test_system_prompt_per_source(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", GOOD[:4])
    d = dcfg(tmp_path, sources=[{"path": path, "system_prompt": "You are Acme support."}])
    build(d, *tiny_tok(), str(tmp_path / "o"))
    from datasets import load_from_disk

    tok = tiny_tok()[0]
    text = tok.decode(load_from_disk(str(tmp_path / "o" / "train"))[0]["input_ids"])
    assert text.startswith("<|bos|><|im_start|>system\nYou are Acme support.<|im_end|>")


# ---- tokenization, templates, truncation -----------------------------------------------------


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


TRIMMING = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|im_end|>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] | trim + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("messages", [
    # the assistant's raw content ("Sure ") is not in the render, but the next user turn starts with it
    [(U, "hi"), (A, "Sure "), (U, "Sure thing, my card was stolen"), (A, "I am sorry.")],
    # the raw content is nowhere in the render
    [(U, "hi"), (A, "Hello "), (U, "bye"), (A, " Bye.")],
])
def test_prefix_labels_hold_when_the_template_changes_the_content(messages):
    """A template that trims the content (Llama-3's does) and has no generation tags: the labels from
    prefix renders are exactly transformers' assistant mask of the same template with tags — no
    user turn and no separator after the end-of-turn token labelled."""
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    msgs = [{"role": r, "content": c} for r, c in messages]
    tok.chat_template = TRIMMING
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tok.chat_template = TRIMMING.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, labels = _tokenize_by_prefix(tok, msgs, end_of_turn_id(tok))
    assert ids == list(out["input_ids"])
    assert [l != IGNORE for l in labels] == [bool(m) for m in out["assistant_masks"]]


# ---- tokenization errors, strict after lenient, warnings ------------------------------------------

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
    tok, _ = tiny_tok()
    tok.chat_template = ALTERNATE_ONLY
    for fast in (True, False):
        with pytest.raises(DataError) as e:
            build(dcfg(tmp_path, train_files=[path], fast_tokenization=fast), tok, end_of_turn_id(tok), str(tmp_path / "o2"))
        assert str(e.value) == (f"{path}:2: the chat template cannot tokenize this conversation (TemplateError: Conversation "
                                "roles must alternate user/assistant/user/assistant/...); fix or remove this record, set "
                                "data.on_error=lenient to skip such records, or set data.chat_template to a template that accepts it.")
    # lenient: skipped, counted and located like any invalid record (Mistral's template on ABCD data: arch probe)
    stats = build(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, end_of_turn_id(tok), str(tmp_path / "o3"))
    assert stats["train"]["conversations"] == 1 and stats["unrenderable"] == {"count": 1, "where": [f"{path}:2"]}
    assert (f"warning: 1 conversation(s) the chat template cannot render were skipped (data.on_error=lenient; at {path}:2); "
            "data.on_error=strict names the template's error.") in data_warnings(stats)
    only = jsonl(tmp_path / "only.jsonl", [{"id": f"a{i}", "messages": ASSISTANT_FIRST} for i in range(3)])
    with pytest.raises(DataError, match=rf"no training conversation in {only}: the chat template refused 3 of them \(first at "
                                        rf"{only}:1, {only}:2, {only}:3\), .* data.on_error=strict to see the template's error"):
        build(dcfg(tmp_path, train_files=[only], on_error="lenient"), tok, end_of_turn_id(tok), str(tmp_path / "o4"))
    prepare_cached(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, end_of_turn_id(tok), log=lambda m: None)
    with pytest.raises(DataError, match=rf"lenient, which skipped 1 records \(1 unrenderable\) \(the template refused {path}:2\)"):
        prepare_cached(dcfg(tmp_path, train_files=[path]), tok, end_of_turn_id(tok), log=lambda m: None)  # a strict run on that cache


def test_strict_run_stops_on_records_a_lenient_build_skipped(tmp_path):
    """data.on_error is not in the cache key (it does not change what a build keeps when nothing is
    wrong); a strict run that hits a lenient build's cache still stops with the errors a build gives."""
    tok, eot = tiny_tok()
    path = jsonl(tmp_path / "a.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD) + BAD["unknown_role"][0] + "\n")
    lenient = prepare_cached(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, eot, log=lambda m: None)[3]
    assert lenient["validation"]["skipped"] == {"unknown_role": 1}
    with pytest.raises(DataError) as built:
        build(dcfg(tmp_path, train_files=[path]), tok, eot, str(tmp_path / "fresh"))
    with pytest.raises(DataError) as hit:
        prepare_cached(dcfg(tmp_path, train_files=[path]), tok, eot, log=lambda m: None)
    assert str(hit.value) == str(built.value) and str(hit.value).startswith(f"{path}:7: messages[0] has role 'customer'")
    assert prepare_cached(dcfg(tmp_path, train_files=[path], on_error="lenient"), tok, eot, log=lambda m: None)[3]["cache"]["hit"]


def test_truncation_warning_threshold():
    from data_pipeline.dataset import data_warnings

    def stats(truncated):
        return {"validation": {"records_read": 100, "records_kept": 100, "skipped": {}}, "max_seq_len": 512,
                "truncation": {"policy": "right", "truncated": truncated, "dropped": 0, "truncated_share": truncated / 100}}

    assert data_warnings(stats(10)) == [] and len(data_warnings(stats(11))) == 1


def test_direction_marks_count_as_empty_and_a_duplicate_id_names_the_first_copy(tmp_path):
    from collections import Counter

    from data_pipeline.validate import clean

    for blank in ("\u200e", "\u200f", " \u200e\u200f\n", "\u202a\u2066"):
        got = clean([{"role": U, "content": "q"}, {"role": A, "content": blank}], dcfg(tmp_path), Counter())
        assert got.reason == "empty_content", repr(blank)
    path = jsonl(tmp_path / "dup.jsonl", GOOD[:2] + GOOD[:1])
    with pytest.raises(DataError) as e:
        build(dcfg(tmp_path, train_files=[path]), *tiny_tok(), str(tmp_path / "o"))
    assert str(e.value).splitlines()[0] == f"{path}:3: id 'c0' already appeared at {path}:1; remove one copy (or set data.duplicate_ids=keep)."




def test_a_reply_with_leading_whitespace_trains_no_header_character(tmp_path):
    """Rendered as is, "  What" after the template's "assistant\n" header tokenized as one "\n " token
    that the assistant mask labelled: a header character trained as a target (data probe)."""
    from datasets import load_from_disk

    tok, eot = tiny_tok()
    path = jsonl(tmp_path / "a.jsonl", [conv(0, "hello", "  What kind of card?")])
    stats = build(dcfg(tmp_path, train_files=[path]), tok, eot, str(tmp_path / "o"))
    row = load_from_disk(str(tmp_path / "o" / "train"))[0]
    targets = [t for t in row["labels"] if t != -100]
    assert tok.decode(targets) == "What kind of card?<|im_end|>" and stats["validation"]["repaired"] == {"stripped_reply_whitespace": 1}
