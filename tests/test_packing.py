"""Packing proof: a packed row gives each document exactly the loss it has alone, and a
document's outputs do not change when its neighbours do."""
import json

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.chat import IGNORE, end_of_turn_id, tokenize_conversation
from data_pipeline.packing import collate_packed, fill_ratio, pack
from tests.conftest import ROOT


def _docs(tokenizer, n=5):
    eot = end_of_turn_id(tokenizer)
    lines = (ROOT / "data_pipeline" / "sample_data" / "train.jsonl").read_text().splitlines()
    docs = []
    for line in lines:
        ids, labels = tokenize_conversation(tokenizer, json.loads(line)["messages"], eot)
        if len(ids) <= 120:
            docs.append({"input_ids": ids, "labels": labels})
        if len(docs) == n:
            return docs


def _model(tokenizer, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation=attn, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def _per_doc_loss(logits, labels, row_docs):
    out, at = [], 0
    for d in row_docs:
        n = len(d["input_ids"])
        lg, lb = logits[at:at + n], labels[at:at + n]
        out.append(F.cross_entropy(lg[:-1].float(), lb[1:], ignore_index=IGNORE, reduction="sum").item())
        at += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_one_by_one(tokenizer, attn):
    docs = _docs(tokenizer)
    model = _model(tokenizer, attn)
    batch = collate_packed([docs[:3], docs[3:]], tokenizer.pad_token_id, attn)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        packed = _per_doc_loss(logits[0], batch["labels"][0], docs[:3]) + _per_doc_loss(logits[1], batch["labels"][1], docs[3:])
        alone = []
        for d in docs:
            ids = torch.tensor([d["input_ids"]])
            lg = model(input_ids=ids).logits[0]
            alone.append(F.cross_entropy(lg[:-1], torch.tensor(d["labels"][1:]), ignore_index=IGNORE, reduction="sum").item())
    assert packed == pytest.approx(alone, abs=1e-5, rel=1e-6)


def test_documents_do_not_leak(tokenizer):
    """Change the first document: the second one's logits stay put with the mask, and move
    without it (so this test would fail if the mask stopped separating documents)."""
    docs = _docs(tokenizer, 2)
    model = _model(tokenizer, "sdpa")
    changed = dict(docs[0], input_ids=[(t * 7 + 3) % len(tokenizer) for t in docs[0]["input_ids"]])
    n0 = len(docs[0]["input_ids"])
    n1 = len(docs[1]["input_ids"])

    def second_doc_logits(first, masked):
        b = collate_packed([[first, docs[1]]], tokenizer.pad_token_id, "sdpa")
        with torch.no_grad():
            kw = {"attention_mask": b["attention_mask"]} if masked else {}
            return model(input_ids=b["input_ids"], position_ids=b["position_ids"], **kw).logits[0, n0:n0 + n1]

    assert (second_doc_logits(docs[0], True) - second_doc_logits(changed, True)).abs().max() < 1e-6
    assert (second_doc_logits(docs[0], False) - second_doc_logits(changed, False)).abs().max() > 1e-3


def test_first_token_of_each_document_is_not_a_target(tokenizer):
    docs = _docs(tokenizer, 3)
    for d in docs:
        d["labels"] = list(d["input_ids"])  # everything a target
    b = collate_packed([docs], tokenizer.pad_token_id, "sdpa")
    starts = [0, len(docs[0]["input_ids"]), len(docs[0]["input_ids"]) + len(docs[1]["input_ids"])]
    assert all(b["labels"][0, s] == IGNORE for s in starts)
    assert b["position_ids"][0, starts[1]] == 0 and b["position_ids"][0, starts[2]] == 0


def test_best_fit_decreasing_is_tight_and_deterministic():
    lengths = [500, 400, 300, 300, 200, 100, 100, 90, 10, 1000]
    bins = pack(lengths, 1000, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins)
    assert len(bins) == 3  # 3000 tokens in 3 rows of 1000: optimal here
    assert fill_ratio(bins, lengths, 1000) == 1.0
    assert bins == pack(lengths, 1000, seed=3)
    with pytest.raises(ValueError):
        pack([1001], 1000)
