"""The fast tokenization path gives exactly the chat template's tokens and labels, or declines."""
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_pipeline.chat import TEMPLATES, encode, end_of_turn_id, tokenize_conversation
from data_pipeline.fastchat import FastEncoder, tiktoken_encoder

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "model" / "tiny" / "tokenizer"

SAMPLE = Path(__file__).resolve().parent.parent / "data_pipeline" / "sample_data"
CONVS = [json.loads(line)["messages"] for name in ("train.jsonl", "eval.jsonl")
         for line in (SAMPLE / name).read_text().splitlines()]
# contents that must fall back (or tokenize identically): boundary whitespace, special-token text,
# a leading newline that could merge with the template's "\n", a non-Latin script, digits
EDGE = [
    [{"role": "user", "content": " leading space"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nstarts with newlines"}],
    [{"role": "user", "content": "inject <|im_end|> here"}, {"role": "assistant", "content": "no <|im_start|>"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "订单 12345 在哪里？"},
     {"role": "assistant", "content": "您的订单已发货。"}, {"role": "user", "content": "'s 've 123456"},
     {"role": "assistant", "content": "!!! ??? ..."}],
]


def _tok(template=None):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if template:
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = TEMPLATES[template]
    return tok


@pytest.mark.parametrize("template", [None, "chatml", "qwen2", "llama-3"])
def test_fast_path_equals_chat_template_on_every_bundled_conversation(template):
    tok = _tok(template)
    eot = end_of_turn_id(tok)
    fast, why = FastEncoder.build(tok, eot, CONVS[:64])
    assert fast is not None, why
    assert fast.backend == "tiktoken"
    used = 0
    for conv in CONVS + EDGE:
        got = fast.encode(conv)
        if got is not None:
            used += 1
            assert got == tokenize_conversation(tok, conv, eot), conv
        # through encode(), with or without the fast path, the result is the same
        for last in (False, True):
            assert encode(tok, conv, eot, 96, "keep_recent", last, fast) == encode(tok, conv, eot, 96, "keep_recent", last)
    assert used >= 0.95 * len(CONVS)
    assert fast.encode(EDGE[0]) is None and fast.encode(EDGE[2]) is None  # these must take the exact path


def test_templates_it_cannot_read_are_declined():
    tok = _tok("mistral")  # folds the system prompt into the first user turn
    fast, why = FastEncoder.build(tok, end_of_turn_id(tok), CONVS[:8])
    assert fast is None and "content" in why


def test_a_template_whose_text_merges_with_content_falls_back_per_conversation():
    tok = _tok()
    # "assistant:" + " " joins the content's first word in byte-level BPE (" Hello" is one pre-token)
    tok.chat_template = TEMPLATES["chatml"].replace("message['role'] + '\\n'", "message['role'] + ': '")
    eot = end_of_turn_id(tok)
    fast, why = FastEncoder.build(tok, eot, CONVS[:64])
    if fast is None:  # declining is fine; silently wrong is not
        assert why
        return
    for conv in CONVS[:100]:
        got = fast.encode(conv)
        assert got is None or got == tokenize_conversation(tok, conv, eot)


def test_tiktoken_conversion_llama3_style_split_and_non_byte_level(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    texts = [m["content"] for c in CONVS for m in c]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    llama_like = PreTrainedTokenizerFast(tokenizer_object=raw)
    enc, why = tiktoken_encoder(llama_like)
    assert enc is not None, why
    for t in texts[:500] + ["Numbers 1234567 and\n\n\nnewlines  twice", "订单 12345"]:
        assert enc(t) == llama_like.backend_tokenizer.encode(t, add_special_tokens=False).ids

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(texts[:200], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    enc, why = tiktoken_encoder(PreTrainedTokenizerFast(tokenizer_object=wordpiece))
    assert enc is None and "BPE" in why


def test_build_gives_identical_datasets_with_and_without_the_fast_path(tmp_path):
    from omegaconf import OmegaConf

    from data_pipeline.cache import cache_key
    from data_pipeline.dataset import build
    from train.config import DataConfig

    tok = _tok()
    eot = end_of_turn_id(tok)
    out = {}
    for flag in (True, False):
        d = OmegaConf.merge(OmegaConf.structured(DataConfig), {
            "train_files": [str(SAMPLE / "train.jsonl")], "eval_files": [str(SAMPLE / "eval.jsonl")],
            "max_seq_len": 256, "fast_tokenization": flag, "cache_dir": str(tmp_path)})
        lines = []
        build(d, tok, eot, str(tmp_path / f"out{flag}"), log=lines.append)
        assert any("fast path (tiktoken)" in line for line in lines) == flag
        out[flag] = (cache_key(d, tok, eot), json.loads((tmp_path / f"out{flag}" / "stats.json").read_text()))
        from datasets import load_from_disk

        for split in ("train", "eval"):
            ds = load_from_disk(str(tmp_path / f"out{flag}" / split))
            out[(flag, split)] = (ds["input_ids"][:], ds["labels"][:])
    # the same result, in separate cache entries: turning the fast path off to rule it out rebuilds
    assert out[True][0] != out[False][0]
    for split in ("train", "eval"):
        assert out[(True, split)] == out[(False, split)]
