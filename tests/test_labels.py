"""Labels sit on assistant tokens (and their end-of-turn token) only."""
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
    spans, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE:
            assert l == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tokenizer.decode(s) for s in spans] == [
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
    assert not set(sum(a, [])) & set(sum(b, []))
    assert a == batching.epoch_micro_batches(50, 4, 2, 0, seed=1, epoch=0)
    assert a != batching.epoch_micro_batches(50, 4, 2, 0, seed=1, epoch=1)


def test_a_tokenizer_that_adds_bos_itself_still_gives_one_bos_and_the_same_labels(tokenizer):
    """Llama-style tokenizers add BOS in their post-processor while the chat template also writes
    it: every encoding path (template mask, prefix fallback, fast path, eval prompt) must give one
    BOS and the labels of a tokenizer that does not (the bundled one, whose post-processor adds none)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from data_pipeline.fastchat import FastEncoder
    from tests.conftest import TOKENIZER_DIR
    from train.evaluate import prompt_ids

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
