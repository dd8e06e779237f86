"""Assistant messages with "weight": 0 (OpenAI's fine-tuning format) are context, never targets:
on every tokenization path, under last_turn labels and keep_recent truncation, in the built data
and in the held-out conversations a generation eval answers."""
import json
import re

import pytest

from data_pipeline.chat import TEMPLATES, _tokenize_by_prefix, encode, end_of_turn_id
from data_pipeline.dataset import build
from data_pipeline.fastchat import FastEncoder
from tests.data_helpers import dcfg, jsonl, tiny_tok
from tests.test_labels import _spans as _targets  # (the decoded text of each run of labelled tokens)

BAD, GOOD = "A wrong answer the agent gave.", "The answer to learn."
CONV = [{"role": "system", "content": "You are the support agent of Acme."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": BAD, "weight": 0},
        {"role": "user", "content": "That is not right."},
        {"role": "assistant", "content": GOOD, "weight": 1}]


@pytest.mark.parametrize("path", ["template", "prefix", "fast", "llama-3 template"])
def test_a_weight_0_turn_is_context_on_every_tokenization_path(path):
    tok, _ = tiny_tok()
    if path == "llama-3 template":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = TEMPLATES["llama-3"]
    eot = end_of_turn_id(tok)
    fast = None
    if path == "fast":
        fast, why = FastEncoder.build(tok, eot, [CONV])
        assert fast is not None, why
    if path == "prefix":  # (a template without {% generation %} tags)
        import data_pipeline.chat as chat

        ids, labels = _tokenize_by_prefix(tok, CONV, eot)
        labels = chat._drop_untrained(labels, CONV)
    else:
        ids, labels, outcome = encode(tok, CONV, eot, 4096, fast=fast)
        assert outcome == "ok"
    eot_text = tok.convert_ids_to_tokens(eot)
    assert _targets(tok, ids, labels) == [GOOD + eot_text]  # the weight-0 reply is in ids (context) but no target
    assert BAD in tok.decode(ids)
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in CONV]
    ids2, labels2, _ = encode(tok, unweighted, eot, 4096)
    assert ids2 == ids and _targets(tok, ids2, labels2) == [BAD + eot_text, GOOD + eot_text]


def test_last_turn_labels_and_keep_recent_truncation_follow_the_weights():
    tok, eot = tiny_tok()
    eot_text = tok.convert_ids_to_tokens(eot)
    flipped = CONV[:2] + [{"role": "assistant", "content": GOOD}, CONV[3], {"role": "assistant", "content": BAD, "weight": 0}]
    ids, labels, _ = encode(tok, flipped, eot, 4096, last_turn_only=True)
    assert _targets(tok, ids, labels) == [GOOD + eot_text]  # the final turn that is trained on
    # too long for all of it: keep_recent drops the oldest exchange only as far as a trained reply stays
    long = [CONV[0]] + [{"role": "user", "content": "old question " * 40}, {"role": "assistant", "content": "old answer " * 40},
                        {"role": "user", "content": "Is it shipped?"}, {"role": "assistant", "content": GOOD},
                        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": BAD, "weight": 0}]
    full, _, _ = encode(tok, long, eot, 4096)
    ids, labels, outcome = encode(tok, long, eot, len(full) - 50)
    assert outcome == "truncated" and "old question" not in tok.decode(ids) and "Is it shipped?" in tok.decode(ids)
    assert _targets(tok, ids, labels) == [GOOD + eot_text]


def test_built_data_and_the_eval_conversations_honour_weights(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"reply {i}"},
                          {"role": "user", "content": "more?"}, {"role": "assistant", "content": f"wrong {i}", "weight": 0}]}
            for i in range(4)]
    rows.append({"conversations": [{"from": "human", "value": "sharegpt q"}, {"from": "gpt", "value": "bad", "weight": 0},
                                   {"from": "human", "value": "again"}, {"from": "gpt", "value": "good", "weight": 1}]})
    path = jsonl(tmp_path / "w.jsonl", rows)
    evals = jsonl(tmp_path / "e.jsonl", rows[:2])
    tok, eot = tiny_tok()
    stats = build(dcfg(tmp_path, train_files=[path], eval_files=[evals]), tok, eot, str(tmp_path / "o"))
    from datasets import load_from_disk

    train = load_from_disk(str(tmp_path / "o" / "train"))
    eot_text = tok.convert_ids_to_tokens(eot)
    targets = sorted(t for row in train for t in _targets(tok, row["input_ids"], row["labels"]))
    assert targets == sorted([f"reply {i}{eot_text}" for i in range(4)] + [f"good{eot_text}"])
    assert stats["train"]["target_tokens"] == sum(row["n_targets"] for row in train)
    # a generation eval answers the last reply that is trained on, not the weight-0 one after it
    held = [json.loads(line) for line in (tmp_path / "o" / "eval_messages.jsonl").read_text().splitlines()]
    assert [r["messages"][-1] for r in held] == [{"role": "assistant", "content": f"reply {i}"} for i in range(2)]


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}],
     "messages[0] (user) has a weight; only assistant messages take one"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
     "messages[1] has weight 0.5; use 0 (context only, not trained on) or 1"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "0"}], "messages[1] has weight '0'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
     "every assistant turn has weight 0, so there is nothing to learn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}],
     "messages[1] and [2] are consecutive assistant turns with different weights"),
])
def test_bad_weights_are_refused_naming_the_line(tmp_path, messages, says):
    from data_pipeline.chat import DataError

    path = jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}]},
                                          {"messages": messages}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: " + re.escape(says)):
        build(dcfg(tmp_path, train_files=[path]), *tiny_tok(), str(tmp_path / "o"))
