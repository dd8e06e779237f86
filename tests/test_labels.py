"""Labels sit on assistant tokens (and their end-of-turn token) only."""
import pytest

from data_pipeline import batching
from data_pipeline.chat import IGNORE, _tokenize_by_prefix, end_of_turn_id, tokenize_conversation

CONV = [
    {"role": "system", "content": "You are the support agent of Acme."},
    {"role": "user", "content": "My order 4411 has not arrived."},
    {"role": "assistant", "content": "Sorry to hear that! Let me check order 4411."},
    {"role": "user", "content": "Thanks, 谢谢."},
    {"role": "assistant", "content": "It ships tomorrow."},
]


def test_exactly_assistant_tokens_are_labelled(tokenizer):
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    ids, labels = tokenize_conversation(tokenizer, CONV, eot)
    assert len(ids) == len(labels)
    # Decode the labelled spans: they are exactly the two assistant contents + end-of-turn.
    assert _spans(tokenizer, ids, labels) == [
        "Sorry to hear that! Let me check order 4411.<|im_end|>",
        "It ships tomorrow.<|im_end|>",
    ]
    # Per token: everything outside those spans (system, user, role headers, newlines) is IGNORE.
    text_of_ignored = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    for m in CONV:
        if m["role"] != "assistant":
            assert m["content"] in text_of_ignored
    assert "<|im_start|>assistant\n" in text_of_ignored
    assert ids.count(tokenizer.bos_token_id) == 1


def test_prefix_path_matches_generation_mask(tokenizer):
    """The fallback for templates without {% generation %} gives the same labels."""
    eot = end_of_turn_id(tokenizer)
    ids, labels = tokenize_conversation(tokenizer, CONV, eot)
    ids2, labels2 = _tokenize_by_prefix(tokenizer, CONV, eot)
    assert ids == ids2 and labels == labels2


def test_collate_pads_without_targets(tokenizer):
    eot = end_of_turn_id(tokenizer)
    a = tokenize_conversation(tokenizer, CONV, eot)
    b = tokenize_conversation(tokenizer, CONV[1:3], eot)
    batch = batching.collate([{"input_ids": a[0], "labels": a[1]}, {"input_ids": b[0], "labels": b[1]}],
                             pad_id=tokenizer.pad_token_id)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    n = len(b[0])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][1, n:] == IGNORE).all()
    assert (batch["attention_mask"][1, n:] == 0).all() and (batch["attention_mask"][1, :n] == 1).all()
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all()
    expected = sum(1 for l in a[1][1:] if l != IGNORE) + sum(1 for l in b[1][1:] if l != IGNORE)
    assert batching.target_tokens(batch) == expected


def test_eval_batches_cover_every_example_once_and_ranks_align():
    plans = [batching.eval_micro_batches(11, 2, 3, r) for r in range(3)]
    assert len({len(p) for p in plans}) == 1  # same number of forwards on every rank (ZeRO-3)
    seen = sorted(i for p in plans for mb in p for i in mb if i >= 0)
    assert seen == list(range(11))


def test_train_batches_are_disjoint_across_ranks_and_deterministic():
    a = batching.epoch_micro_batches(50, 4, 2, 0, seed=1, epoch=0)
    b = batching.epoch_micro_batches(50, 4, 2, 1, seed=1, epoch=0)
    assert not set(sum(a, [])) & set(sum(b, [])) - {-1}
    assert a == batching.epoch_micro_batches(50, 4, 2, 0, seed=1, epoch=0)
    assert a != batching.epoch_micro_batches(50, 4, 2, 0, seed=1, epoch=1)
    # every example once a pass: the last global micro-batch (6 of 8 slots) is filled up with -1
    # (a row without targets), not left out (up to micro_batch_size x ranks - 1 examples a pass)
    assert len(a) == len(b) == 7 and sorted(i for i in sum(a + b, []) if i >= 0) == list(range(50))
    assert sum(a + b, []).count(-1) == 6 and all(i == -1 for i in (a[-1] + b[-1])[6:])
    from datasets import Dataset  # a filler is one token without a target: it costs (and counts in perf/tokens) one token

    rows = batching.fetch(Dataset.from_list([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}]), [0, -1])
    assert rows[1] == {"input_ids": [1], "labels": [-100], "is_padding": True} and batching.target_tokens(batching.collate(rows, 0)) == 2


def test_epochs_are_rounded_up_to_whole_steps():
    """train.epochs=N passes: 10 conversations in micro-batches of 2 = 5 a pass; accumulating 3, 2
    passes take 4 steps (the last reaches into a third pass), not 2 (1.2 passes)."""
    assert batching.epoch_steps(10, 2, 1, 3, 2) == 4 and batching.epoch_steps(10, 2, 1, 1, 2) == 10
    assert batching.epoch_steps(307, 4, 8, 4, 3) == 8  # 10 micro-batches a pass per rank (the last filled up): 30 / 4
    assert batching.epoch_steps(10, 2, 1, 6, 1) == 0  # fewer micro-batches than a step takes: refused by the recipe
    stream = batching.MicroBatchStream(10, 2, 1, 0, 0)
    for _ in range(4 * 3):
        stream.next()
    assert stream.epoch + stream.pos / len(stream._plan) >= 2  # what train/epoch logs at the last step


def test_a_tokenizer_that_adds_bos_itself_still_gives_one_bos_and_the_same_labels(tokenizer):
    """Llama-style tokenizers add BOS in their post-processor while the chat template also writes
    it: every encoding path (template mask, prefix fallback, fast path, eval prompt) must give one
    BOS and the labels of a tokenizer that does not (the bundled one, whose post-processor adds none)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from data_pipeline.fastchat import FastEncoder
    from tests.conftest import TOKENIZER_DIR
    from train.generation import prompt_ids

    bos = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos.bos_token} $A", pair=f"{bos.bos_token} $A $B", special_tokens=[(bos.bos_token, bos.bos_token_id)])
    assert bos("hi")["input_ids"][0] == bos.bos_token_id != tokenizer("hi")["input_ids"][0]  # the control
    eot = end_of_turn_id(tokenizer)
    want = tokenize_conversation(tokenizer, CONV, eot)
    assert want[0].count(tokenizer.bos_token_id) == 1
    assert tokenize_conversation(bos, CONV, eot) == want
    assert _tokenize_by_prefix(bos, CONV, eot) == want
    fast, why = FastEncoder.build(bos, eot, [CONV])
    assert fast is not None, why
    assert fast.encode(CONV) == want
    prompt = prompt_ids(bos, CONV[:-1], 512)
    assert prompt == prompt_ids(tokenizer, CONV[:-1], 512) and prompt.count(bos.bos_token_id) == 1


# Real models' templates have no {% generation %} tags: labels come from prefix renders. Meta's
# Llama-3 template writes BOS inside the first message (an empty conversation renders without
# it); Qwen2.5's adds a default system prompt. Each has a tagged twin that renders the same text,
# whose transformers assistant mask is the reference.
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
          "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
          "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
          "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
          "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
          "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
ASSISTANT_FIRST = [  # ABCD: the agent greets first
    {"role": "assistant", "content": "Hi!\nHow can I help you? "},  # Llama-3's template trims it
    {"role": "user", "content": "I need to return an item."},
    {"role": "assistant", "content": "Sure, may I have your name please?"},
    {"role": "user", "content": "Crystal Minh"},
    {"role": "assistant", "content": "Thanks, Crystal."},
]


def _untagged(tmp_path, name, tagged):
    """The tiny tokenizer saved with a tag-free template and loaded back, as a real model's is."""
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = tagged.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok.save_pretrained(str(tmp_path / name))
    return AutoTokenizer.from_pretrained(str(tmp_path / name))


@pytest.mark.parametrize("name,tagged", [("llama-3", LLAMA3), ("qwen2.5", QWEN25)], ids=["llama-3", "qwen2.5"])
@pytest.mark.parametrize("head", [[], [{"role": "system", "content": "You are the support agent of Acme."}]],
                         ids=["assistant_first", "system_then_assistant"])
def test_assistant_first_conversation_without_generation_tags(tmp_path, name, tagged, head):
    """An assistant-first conversation (no prefix to render: transformers refuses an empty one)
    is tokenized as transformers renders it, with labels on exactly each assistant content and its
    end-of-turn token, the same as the tagged template's assistant mask."""
    from data_pipeline.chat import _uses_generation_tags

    tok = _untagged(tmp_path, name, tagged)
    assert not _uses_generation_tags(tok)
    eot = end_of_turn_id(tok)
    msgs = head + ASSISTANT_FIRST
    ids, labels = tokenize_conversation(tok, msgs, eot)
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    eot_text = tok.convert_ids_to_tokens(eot)
    trim = str.strip if name == "llama-3" else str
    assert _spans(tok, ids, labels) == [trim(m["content"]) + eot_text for m in msgs if m["role"] == "assistant"]
    tok.chat_template = tagged
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(ref["input_ids"]) == ids
    assert [l != IGNORE for l in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert ids.count(tok.bos_token_id) == (1 if name == "llama-3" else 0)


def _spans(tok, ids, labels):
    """The decoded text of each run of labelled tokens."""
    spans, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return [tok.decode(s) for s in spans + ([cur] if cur else [])]
