"""Data sources as configured: Arrow's null fields (Parquet, saved datasets) read as absent, a file
named twice refused, ids unique within a source, a source that gives nothing listed and warned
about (on a cache hit too), a blank system prompt refused in the config, a CSV quote never closed."""
import json

import pytest

from data_pipeline.cache import prepare_cached
from data_pipeline.chat import DataError
from data_pipeline.dataset import build, data_warnings
from data_pipeline.records import read_records
from launch.prepare import report_text
from tests.data_helpers import GOOD, conv, dcfg, jsonl, tiny_tok
from train.config import ConfigError
from train.validate import validate_data

S, U, A = "system", "user", "assistant"

WEIGHTED = [  # OpenAI's format with per-message weights, on some assistant turns only
    {"id": "w0", "messages": [{"role": S, "content": "be brief"}, {"role": U, "content": "q0"},
                              {"role": A, "content": "ctx reply", "weight": 0}, {"role": U, "content": "q1"},
                              {"role": A, "content": "trained reply"}]},
    {"id": "w1", "messages": [{"role": U, "content": "q2"}, {"role": A, "content": "a2", "weight": 1}]},
    {"messages": [{"role": U, "content": "q3"}, {"role": A, "content": "a3"}]},
]
SHAREGPT = [{"id": "s0", "conversations": [{"from": "human", "value": "h0"}, {"from": "gpt", "value": "g0", "weight": 0},
                                           {"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"}]},
            {"id": "s1", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "h2"},
                                           {"from": "gpt", "value": "g2"}]}]


def _rows(stats_path):
    from datasets import load_from_disk

    ds = load_from_disk(f"{stats_path}/train")
    return [{k: v for k, v in r.items() if k != "where"} for r in ds]  # (where: file:line vs file:row N)


@pytest.mark.parametrize("records", [WEIGHTED, SHAREGPT], ids=["messages", "sharegpt"])
def test_parquet_and_saved_dataset_copies_train_exactly_like_the_jsonl(tmp_path, records):
    """Arrow gives every message every key, null where the JSON had none: a null weight is no weight."""
    import pandas as pd
    from datasets import Dataset

    src = jsonl(tmp_path / "a.jsonl", records)
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    turns = "messages" if "messages" in records[0] else "conversations"
    assert any(t["weight"] is None for _, r in read_records(str(tmp_path / "a.parquet")) for t in r[turns])  # (the cause)
    tok, eot = tiny_tok()
    built = {}
    for name, path in (("jsonl", src), ("parquet", str(tmp_path / "a.parquet")), ("saved", str(tmp_path / "ds"))):
        stats = build(dcfg(tmp_path, train_files=[path]), tok, eot, str(tmp_path / name))
        assert stats["validation"]["records_kept"] == len(records), name
        built[name] = _rows(tmp_path / name)
    assert built["parquet"] == built["jsonl"] == built["saved"]
    assert any(r["untrained"] for r in built["jsonl"])  # the weight-0 turns are context there too


def test_a_file_named_twice_in_one_split_is_refused_naming_both_entries(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", GOOD)
    b = jsonl(tmp_path / "b.jsonl", [conv(10 + i, f"x{i}", f"y{i}") for i in range(3)])
    with pytest.raises(ConfigError) as e:
        validate_data(dcfg(tmp_path, sources=[{"path": a}, {"path": a, "weight": 2}]))
    assert str(e.value) == (f"data.sources[0].path={a!r} and data.sources[1].path={a!r} both name {a}, which would be trained on "
                            "twice and reported once; list it once, in one source, and give that source a weight to repeat it "
                            "(weight: 2 trains on it twice).")
    pattern = str(tmp_path / "*.jsonl")  # a pattern overlapping a path, and another spelling of it
    with pytest.raises(ConfigError, match=rf"^data.train_files\[0\]='\S+/./b.jsonl' and data.sources\[0\].path='\S+/\*.jsonl' "
                                          rf"both name {b}, which would be trained on twice"):
        validate_data(dcfg(tmp_path, train_files=[f"{tmp_path}/./b.jsonl"], sources=[{"path": pattern}]))
    with pytest.raises(ConfigError, match=r"^data.eval_files\[0\]=.* both name .*, which would be evaluated twice and reported "
                                          r"once; list it once.$"):
        validate_data(dcfg(tmp_path, train_files=[b], eval_files=[a, a]))
    validate_data(dcfg(tmp_path, train_files=[b], eval_files=[b]))  # trained on and held out: warned about when prepared


def test_ids_are_unique_within_a_source_and_an_empty_id_is_none(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", GOOD[:3])
    other = jsonl(tmp_path / "other.jsonl", [conv(i, f"other q{i}", f"other a{i}") for i in range(3)])  # its own c0, c1, c2
    for on_error in ("strict", "lenient"):
        stats = build(dcfg(tmp_path, train_files=[a, other], on_error=on_error), *tiny_tok(), str(tmp_path / on_error))
        assert stats["validation"]["records_kept"] == 6 and not stats["validation"]["skipped"], on_error
    csv = tmp_path / "pc.csv"
    csv.write_text("id,prompt,completion\n,p0,c0\n,p1,c1\nx2,p2,c2\n")
    assert build(dcfg(tmp_path, train_files=[str(csv)]), *tiny_tok(), str(tmp_path / "csv"))["train"]["conversations"] == 3
    twice = jsonl(tmp_path / "twice.jsonl", [conv(0, "q", "a"), conv(0, "q again", "a again")])
    with pytest.raises(DataError, match=rf"^{twice}:2: id 'c0' already appeared at {twice}:1; remove one copy"):
        build(dcfg(tmp_path, train_files=[twice]), *tiny_tok(), str(tmp_path / "twice"))


def test_a_source_that_gives_nothing_is_listed_and_warned_about_on_a_hit_too(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", GOOD)
    empty = jsonl(tmp_path / "empty.jsonl", [])
    bad = jsonl(tmp_path / "bad.jsonl", [], raw='{"messages": [\n{"foo": 1}\n')
    one = jsonl(tmp_path / "one.jsonl", [conv(50, "the only question", "the only answer")])
    tok, eot = tiny_tok()
    d = dcfg(tmp_path, on_error="lenient", sources=[{"path": good}, {"path": empty}, {"path": bad}, {"path": one}],
             eval_fraction=0.5, seed=3)
    for hit in (False, True):
        said = []
        *_, stats, _ = prepare_cached(d, tok, eot, log=said.append)
        assert stats["cache"]["hit"] is hit
        train = stats["train"]["sources"]
        assert list(train) == [good, empty, bad, one] and [train[p]["conversations"] for p in (empty, bad, one)] == [0] * 3
        for line in (f"warning: {empty} gives the training set no conversation (it holds no records); fix the file, or "
                     "remove it from the data config.",
                     f"warning: {bad} gives the training set no conversation (of its 2 records, 2 skipped as invalid "
                     "(data.on_error=lenient)); fix the file, or remove it from the data config.",
                     f"warning: {one} gives the training set no conversation (of its 1 record, 1 held out for eval "
                     "(data.eval_fraction)); fix the file, or remove it from the data config."):
            assert line in said, (hit, said)
    text = report_text(stats)
    assert f"  {empty}: 0 conversations, 0 tokens (weight 1.0)" in text
    assert f"  {one}: 1 conversations" in text.split("\neval:")[1] and "(weight" not in text.split("\neval:")[1]
    from train.metrics import data_summary

    assert data_summary(stats, [good, empty, bad, one])["data/train/sources/empty/conversations"] == 0
    held = dcfg(tmp_path, train_files=[good], eval_files=[one, empty])  # a held-out source too
    stats = build(held, tok, eot, str(tmp_path / "held"))
    assert stats["eval"]["sources"][empty]["conversations"] == 0
    assert f"warning: {empty} gives the held-out set no conversation (it holds no records); fix the file, or remove it " \
           "from the data config." in data_warnings(stats)


def test_a_blank_system_prompt_is_refused_in_the_config(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", GOOD)
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].system_prompt=' \\u200b' is blank \(whitespace or invisible "
                                          r"characters only\), an empty system message .*; give it text, or leave it out \(null\) for none.$"):
        validate_data(dcfg(tmp_path, sources=[{"path": a, "system_prompt": "ok"}, {"path": a, "system_prompt": " \u200b",
                                                                                     "split": "eval"}]))
    with pytest.raises(ConfigError, match=r"^data.intent.system_prompt='  ' is blank .* every intent record .*set it to '' for none.$"):
        validate_data(dcfg(tmp_path, train_files=[a], intent={"system_prompt": "  "}))
    validate_data(dcfg(tmp_path, intent={"system_prompt": ""}, sources=[{"path": a, "system_prompt": None}]))


def test_a_csv_quote_never_closed_is_named_at_its_row_and_strict_says_lenient(tmp_path):
    csv = tmp_path / "pc.csv"
    csv.write_text('prompt,completion\np0,c0\n"p1 unterminated,c1\np2,c2\np3,c3\n')
    with pytest.raises(DataError, match=rf"^{csv}:3: a quoted field that starts in this row is never closed \(an unmatched "
                                        r'"\), so every line after it would be read as part of it; close the quote'):
        list(read_records(str(csv)))
    fine = tmp_path / "ok.csv"  # a quoted field over two lines, and a quote inside an unquoted one, read as before
    fine.write_text('prompt,completion\n"two\nlines",c0\np1 5" screen,c1\n')
    assert [r for _, r in read_records(str(fine))] == [{"prompt": "two\nlines", "completion": "c0"},
                                                       {"prompt": 'p1 5" screen', "completion": "c1"}]
    extra = tmp_path / "extra.csv"  # an unquoted comma: one field more than the header (csv.DictReader keeps it under None)
    extra.write_text("prompt,completion\np0,c0\np1, with a comma,c1\n")
    (where, problem), = [(w, r) for w, r in read_records(str(extra)) if not isinstance(r, dict)]
    assert where == f"{extra}:3" and problem.reason == "csv_fields" and problem.message.startswith("3 fields where the header names 2;")
    one_bad = jsonl(tmp_path / "one_bad.jsonl", GOOD[:2], raw=json.dumps(GOOD[0]) + "\n{\n")
    with pytest.raises(DataError, match=r"each line must be one JSON object.\n\(fix it, or set data.on_error=lenient to skip "
                                        r"bad records\)$"):
        build(dcfg(tmp_path, train_files=[one_bad]), *tiny_tok(), str(tmp_path / "o"))
