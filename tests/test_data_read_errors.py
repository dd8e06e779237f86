"""Files that cannot be read as they are (bad bytes, lone surrogates, damaged gzip or Parquet, a
gzip file without .gz, a folder): one sentence naming the file (and line), never a traceback, and
never a record lost without a word."""
import gzip
import json
import random
import re
import subprocess
import sys

import pytest

from data_pipeline.chat import DataError
from data_pipeline.dataset import build
from tests.conftest import ROOT, run_env
from tests.data_helpers import GOOD, dcfg, jsonl, tiny_tok

SURROGATE = '{"messages": [{"role": "user", "content": "hi \\ud800 there"}, {"role": "assistant", "content": "a"}]}'


def _build(tmp_path, files, **kw):
    return build(dcfg(tmp_path, train_files=[str(f) for f in files], **kw), *tiny_tok(), str(tmp_path / "out"), log=lambda m: None)


def _fails(tmp_path, files, message, **kw):
    with pytest.raises(DataError, match=re.escape(message)):
        _build(tmp_path, files, **kw)


def test_a_lone_surrogate_is_named_in_strict_mode_and_skipped_in_lenient(tmp_path):
    """"\\ud800" is valid JSON but no character: it cannot be hashed, written to Arrow or tokenized."""
    path = jsonl(tmp_path / "a.jsonl", None, raw="".join(json.dumps(r) + "\n" for r in GOOD[:2]) + SURROGATE + "\n")
    _fails(tmp_path, [path], f"{path}:3: messages[0] (user) holds a lone surrogate, \\ud800 at character 3")
    stats = _build(tmp_path, [path], on_error="lenient")
    assert stats["validation"]["skipped"] == {"lone_surrogate": 1} and stats["train"]["conversations"] == 2
    pair = json.dumps(GOOD[3]).replace("answer 3", "answer \\ud83d\\ude00")  # a pair is one character: fine
    assert _build(tmp_path, [jsonl(tmp_path / "b.jsonl", None, raw=pair + "\n")])["train"]["conversations"] == 1
    p = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "data=custom", f"data.train_files=[{path}]",
                        f"data.cache_dir={tmp_path / 'c'}"], env=run_env(), capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and f"dialtune: error: {path}:3: " in p.stderr, p.stderr[-2000:]


def test_invalid_utf8_in_json_and_csv_files_is_one_error_per_line_like_jsonl(tmp_path):
    items = [json.dumps(r, indent=1) for r in GOOD]
    text = ("[\n" + ",\n".join(items) + "\n]\n").encode()
    bad_line = text[:text.index(b"question 2")].count(b"\n") + 1
    path = tmp_path / "a.json"
    path.write_bytes(text.replace(b"question 2", b"question \xff2"))
    _fails(tmp_path, [path], f"{path}:{bad_line}: invalid UTF-8 byte 0xff at byte ")
    stats = _build(tmp_path, [path], on_error="lenient")
    v = stats["validation"]
    assert v["records_read"] == len(GOOD) and v["skipped"] == {"invalid_utf8": 1}
    assert v["skipped_examples"]["invalid_utf8"] == [f"{path}:{bad_line}"]

    rows = [b"prompt,completion", b"p0,c0", b"p\xff1,c1", b"p2,c2", b'"p3\nstill p3",c3', b"p4,\" \"", b"p5,c5"]
    path = tmp_path / "a.csv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    _fails(tmp_path, [path], f"{path}:3: invalid UTF-8 byte 0xff at byte 1 of the line")
    v = _build(tmp_path, [path], on_error="lenient")["validation"]
    assert v["records_read"] == 6 and v["records_kept"] == 4  # the bad row counted, not dropped
    assert v["skipped_examples"] == {"invalid_utf8": [f"{path}:3"], "empty_content": [f"{path}:7"]}  # lines after it right
    path.write_bytes(b"pr\xffompt,completion\np,c\n")
    _fails(tmp_path, [path], f"{path}:1: invalid UTF-8 byte 0xff at byte 2 of the line; re-encode the file as UTF-8 (in the header row).")


def test_a_damaged_parquet_file_is_named_with_the_parquet_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(6)], "completion": [f"c{i}" for i in range(6)]}), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:200])
    want = f"{cut}: not a readable Parquet file (Parquet magic bytes not found in footer."
    _fails(tmp_path, [cut], want)  # the only file: not "no usable conversation (0 records read)"
    _fails(tmp_path, [jsonl(tmp_path / "a.jsonl", GOOD), cut], want)  # a second file: not a traceback


def _compressed(rng_seed=0, n=3000):
    rng = random.Random(rng_seed)
    rows = [{"messages": [{"role": "user", "content": f"q{i} {rng.random()}"}, {"role": "assistant", "content": "a"}]}
            for i in range(n)]
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)


@pytest.mark.parametrize("on_error", ["strict", "lenient"])
def test_a_damaged_gzip_file_is_called_corrupt_or_cut_short(tmp_path, on_error):
    data = _compressed()
    crc = bytearray(data)
    crc[-8] ^= 0xFF  # the CRC-32 in the trailer
    mid = bytearray(data)
    for k in range(len(mid) // 2, len(mid) // 2 + 40):
        mid[k] ^= 0x55
    files = {"crc": bytes(crc), "mid": bytes(mid), "cut": data[: len(data) // 2]}
    for name, content in files.items():
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            _build(tmp_path, [path], on_error=on_error)
        said = str(e.value)
        assert "not gzip-compressed" not in said and "\n" not in said, said
        if name == "cut":
            assert re.fullmatch(rf"{re.escape(str(path))}: the gzip data is cut short after line \d+ \(Compressed file ended .*\); "
                                r"the file is incomplete \(an interrupted copy or download\): fetch or compress it again\.", said), said
        else:
            assert said.startswith(f"{path}: the gzip data is corrupt (found after line ") and said.endswith(
                "the file was damaged (in a copy or a download): fetch or compress it again."), said


def test_a_gzip_file_without_gz_and_a_folder_are_named_as_such(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(_compressed(n=5))
    _fails(tmp_path, [path], f"{path}: the file is gzip-compressed (it starts with the bytes 1f 8b), though its name does not "
                             "end in .gz; name it a.jsonl.gz.")
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        jsonl(folder / f"part-{k}.jsonl", GOOD[3 * k:3 * k + 3])
    _fails(tmp_path, [folder], f"{folder} is a folder, not a data file or a saved `datasets` directory; to read the files "
                               f"in it, give a glob pattern, such as '{folder}/*.jsonl' (or '{folder}/**/*.jsonl'")
    from data_pipeline.cache import prepare_cached  # the key hashes no folder it is refused for

    with pytest.raises(DataError, match="is a folder"):
        prepare_cached(dcfg(tmp_path, train_files=[str(folder)]), *tiny_tok(), log=lambda m: None)
    assert _build(tmp_path, [f"{folder}/*.jsonl"])["train"]["conversations"] == len(GOOD)  # what it says works
