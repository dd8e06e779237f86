"""Shared by the data pipeline tests (test_data.py, test_data_cache.py): config and file builders,
good and bad records, the tiny tokenizer."""
import gzip
import json

from omegaconf import OmegaConf

from data_pipeline.chat import end_of_turn_id
from train.config import DataConfig

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


def tiny_tok():
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return tok, end_of_turn_id(tok)


LONG = [{"role": U if i % 2 == 0 else A, "content": f"turn {i} " + "word " * 30} for i in range(10)]
