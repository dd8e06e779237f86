"""The embedded tokenizer is reproducible from local text and has what training needs."""
import json

from model.tiny.build_tokenizer import build
from tests.conftest import TOKENIZER_DIR


def test_rebuild_reproduces_committed_tokenizer(tmp_path):
    build(tmp_path)
    got = json.loads((tmp_path / "tokenizer.json").read_text())
    want = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert got["model"]["vocab"] == want["model"]["vocab"]
    assert got["model"]["merges"] == want["model"]["merges"]


def test_special_tokens(tokenizer):
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
           tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert len(ids) == 4 and None not in ids
    assert "{% generation %}" in tokenizer.chat_template
