"""Files that cannot be read as they are (bad bytes, lone surrogates, damaged gzip or Parquet, a
gzip file without .gz, a folder): one sentence naming the file (and line), never a traceback, and
never a record lost without a word."""
import json
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
