"""The embedded tokenizer is reproducible from local text and has what training needs."""
import json

from omegaconf import OmegaConf

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



def _fake(specials, template="", eos="</s>"):
    from types import SimpleNamespace

    from tokenizers import AddedToken

    decoder = {i: AddedToken(t, special=True) for i, t in enumerate([eos, *specials])}
    return SimpleNamespace(chat_template=template, bos_token=None, eos_token=eos, unk_token=None, added_tokens_decoder=decoder)


def test_a_tokenizer_without_a_pad_pads_with_a_spare_special_token(tmp_path):
    """Llama-3's tokenizer has no pad but reserved special tokens (3.1: <|finetune_right_pad_id|>):
    one of them pads, so the embeddings keep their size (an added token would grow them by a row);
    a pad-named one first, never eos or one the chat template uses; without any, <|pad|> is added."""
    from transformers import AutoTokenizer

    from model.loader import load_tokenizer, spare_special_token
    from train.config import ModelConfig

    assert spare_special_token(_fake(["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"])) == "<|finetune_right_pad_id|>"
    assert spare_special_token(_fake(["<|begin_of_text|>", "<|reserved_special_token_0|>"])) == "<|reserved_special_token_0|>"
    assert spare_special_token(_fake(["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"],
                                     template="{{ '<|reserved_special_token_0|>' }}")) == "<|reserved_special_token_1|>"
    assert spare_special_token(_fake(["<|im_start|>", "<|im_end|>"])) is None
    assert spare_special_token(_fake([], eos="<|pad|>")) is None  # eos is taken
    # load_tokenizer: pad = eos (as many ship) -> the tiny vocabulary's own spare <|pad|>, no token added
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    cfg = OmegaConf.structured(ModelConfig)
    cfg.name_or_path = str(tmp_path)
    loaded = load_tokenizer(cfg)
    assert loaded.pad_token == "<|pad|>" and len(loaded) == len(tok)
