"""Chat records -> validated conversations -> token ids with assistant-only labels.

Reading keeps `file:line` for every record so that a bad record is reported where it is.
Labels: every token of an assistant turn, including the end-of-turn token that closes it, is a
target; everything else (system, user, role headers, padding) is IGNORE.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

IGNORE = -100


class DataError(ValueError):
    """Bad data a user can fix; the message names file:line and what to do."""


# ---------------------------------------------------------------------------------------------
# Tokenization


def end_of_turn_id(tokenizer, override: Optional[str] = None) -> int:
    """The token that closes an assistant turn (what generation must stop at)."""
    if override:
        tid = tokenizer.convert_tokens_to_ids(override)
        if tid is None or tid == tokenizer.unk_token_id:
            raise DataError(f"model.end_of_turn_token={override!r} is not in the tokenizer's vocabulary.")
        return tid
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id and tok in (tokenizer.chat_template or ""):
            return tid
    return tokenizer.eos_token_id


def _uses_generation_tags(tokenizer) -> bool:
    tpl = tokenizer.chat_template or ""
    return "{% generation %}" in tpl or "{%- generation %}" in tpl


def tokenize_conversation(tokenizer, messages: Sequence[Dict[str, str]], eot_id: int) -> Tuple[List[int], List[int]]:
    """Token ids of the rendered conversation and labels on assistant tokens only."""
    if _uses_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = out["assistant_masks"]
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        return ids, labels
    return _tokenize_by_prefix(tokenizer, messages, eot_id)


_FIRST_SENTINEL = "Zq0xQ-first-turn"


def _tokenize_by_prefix(tokenizer, messages, eot_id):
    """Assistant spans from prefix renders, for templates without {% generation %} tags.

    The conversation is rendered once and tokenized once (with offsets); each assistant turn's
    span is [render(msgs[:i], generation prompt), end of the last end-of-turn token in
    render(msgs[:i+1])), so the template's own separators after the end-of-turn token stay
    unlabelled, whatever the template does to the content (trim it, say).
    A conversation that opens with the assistant (ABCD's agent greeting) has no prefix to render
    (transformers refuses an empty conversation, and templates that write BOS only before the
    first message would render the generation prompt without it): its span starts where the
    content starts in a render of that first turn alone, with a sentinel content.
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    eot_text = tokenizer.convert_ids_to_tokens(eot_id)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            probe = tokenizer.apply_chat_template([{"role": "assistant", "content": _FIRST_SENTINEL}], tokenize=False)
            at = probe.find(_FIRST_SENTINEL)
            start_text = probe[:at] if at >= 0 else None
        else:
            start_text = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        if start_text is None or not full.startswith(start_text):
            raise DataError("the chat template renders a conversation prefix differently from the whole, so its assistant turns "
                            "cannot be told apart (Mistral-7B-Instruct-v0.3's puts a system message into the last user turn only, "
                            "and a whole conversation renders without it); set data.chat_template to a named template "
                            "(data.chat_template=mistral for Mistral's models), or leave out the system messages.")
        # the turn ends where the render of the conversation up to it ends; its span, at the last
        # end-of-turn token inside (not at the raw content, which the template may have changed:
        # Llama-3's trims it); a template that renders a final turn unlike a middle one (the
        # prefix is not a prefix of the whole) gets the first end-of-turn token after the start
        upto = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if full.startswith(upto):
            end = full.rfind(eot_text, len(start_text), len(upto))
            end = end + len(eot_text) if end >= 0 else len(upto.rstrip())
        else:
            end = full.find(eot_text, len(start_text))
            end = end + len(eot_text) if end >= 0 else len(full.rstrip())
        spans.append((len(start_text), end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= s and e <= b and e > s for a, b in spans)
        labels.append(tid if inside else IGNORE)
    return list(ids), labels


def _runs(labels: List[int]) -> List[Tuple[int, int]]:
    """[start, end) of each run of labelled tokens: one per assistant turn, in order (user turns lie
    between them)."""
    runs, i = [], 0
    while i < len(labels):
        if labels[i] == IGNORE:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != IGNORE:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _drop_untrained(labels: List[int], messages: Sequence[Dict]) -> List[int]:
    """Labels without the assistant turns of weight 0 (context only)."""
    turns = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if all(turns):
        return labels
    runs = _runs(labels)
    if len(runs) != len(turns):
        raise DataError(f"the chat template's {len(runs)} assistant spans do not match the conversation's {len(turns)} "
                        "assistant turns, so a turn of weight 0 cannot be told apart; remove the weights or set "
                        "data.chat_template to a named template.")
    out = list(labels)
    for (a, b), weight in zip(runs, turns):
        if not weight:
            out[a:b] = [IGNORE] * (b - a)
    return out


def _only_last_turn(labels: List[int]) -> List[int]:
    """Keep the labels of the final labelled span (_runs) only."""
    out = [IGNORE] * len(labels)
    for a, b in _runs(labels)[-1:]:
        out[a:b] = labels[a:b]
    return out


def _has_target(labels: List[int]) -> bool:
    return any(t != IGNORE for t in labels[1:])


def encode(tokenizer, messages: List[Dict[str, str]], eot_id: int, max_len: int, truncation: str = "keep_recent",
           last_turn_only: bool = False, fast=None) -> Tuple[Optional[List[int]], Optional[List[int]], str]:
    """(ids, labels, outcome) with outcome in {"ok", "truncated", "cut", "dropped"}.

    keep_recent drops the oldest turns (a system message stays) until the rest fits; the cut
    point is found by binary search over user-turn starts, so a long conversation costs
    O(log turns) renders, not O(turns^2). When not even the last user turn with what follows
    fits, that is cut on the right ("cut": its last reply loses its end and end-of-turn token);
    `right` always cuts so ("truncated"). A conversation left without an assistant target is dropped. `fast` (a fastchat.FastEncoder)
    gives the same tokens without rendering the template; where it declines, the template is used.
    Assistant messages with "weight": 0 are context, not targets (last_turn_only: the final turn
    that is a target).
    """
    def enc(msgs):
        got = fast.encode(msgs) if fast is not None else None
        ids, labels = got if got is not None else tokenize_conversation(tokenizer, msgs, eot_id)
        labels = _drop_untrained(labels, msgs)
        return ids, (_only_last_turn(labels) if last_turn_only else labels)

    ids, labels = enc(messages)
    if len(ids) <= max_len:
        return ids, labels, "ok"
    if truncation == "drop":
        return None, None, "dropped"
    if truncation == "keep_recent":
        head = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(head):]
        starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0 and
                  any(x["role"] == "assistant" and x.get("weight", 1) for x in body[i:])]
        lo, hi, best = 0, len(starts) - 1, None
        while lo <= hi:  # smallest cut (most context kept) that fits
            mid = (lo + hi) // 2
            cand = enc(head + body[starts[mid]:])
            if len(cand[0]) <= max_len:
                best, hi = cand, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best[0], best[1], "truncated"
        if starts:
            ids, labels = enc(head + body[starts[-1]:])
    ids, labels = ids[:max_len], labels[:max_len]
    if not _has_target(labels):
        return None, None, "dropped"
    return ids, labels, "cut" if truncation == "keep_recent" else "truncated"


# ---------------------------------------------------------------------------------------------
# Named chat templates for tokenizers without one (data.chat_template=NAME). Assistant turns are
# wrapped in {% generation %} so transformers returns the assistant-token mask.

_CHATML_BODY = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": _CHATML_BODY,
    "qwen2": "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + _CHATML_BODY,
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + ((system + '\n\n') if system and loop.index0 <= 1 else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% endif %}{% endfor %}"
    ),
}
TEMPLATE_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"], "qwen2": ["<|im_start|>", "<|im_end|>"],
                   "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "mistral": []}


def apply_named_template(tokenizer, name: Optional[str]) -> None:
    """Install a named template (when asked, or when the tokenizer has none)."""
    if name is None:
        if tokenizer.chat_template:
            return
        raise DataError("the tokenizer has no chat template; set data.chat_template to one of " + ", ".join(TEMPLATES) + ".")
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
    if missing:
        raise DataError(f"data.chat_template={name} needs the tokens {', '.join(missing)}, which this tokenizer lacks; pick a template it supports or add them (with peft.modules_to_save=[embed_tokens,lm_head]).")
    tokenizer.chat_template = TEMPLATES[name]
