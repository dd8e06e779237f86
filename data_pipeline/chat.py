"""Chat records -> validated conversations -> token ids with assistant-only labels.

Reading keeps `file:line` for every record so that a bad record is reported where it is.
Labels: every token of an assistant turn, including the end-of-turn token that closes it, is a
target; everything else (system, user, role headers, padding) is IGNORE.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad data a user can fix; the message names file:line and what to do."""


@dataclass
class Conversation:
    messages: List[Dict[str, str]]
    where: str  # "file:line"


def open_text(path: str) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def check_messages(messages, where: str) -> List[Dict[str, str]]:
    """Return the messages if they form a trainable conversation, else raise DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'.")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}] ({role}) has empty or non-text content; fix or remove the turn.")
        if role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}] is a system message; a system message may only come first.")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; add one or remove the record.")
    return out


def read_conversations(path: str) -> Iterator[Conversation]:
    """Yield the conversations of a chat-JSONL file (optionally .gz), checked, with file:line."""
    try:
        f = open_text(path)
        with f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object.") from None
                if not isinstance(rec, dict) or "messages" not in rec:
                    raise DataError(f"{where}: expected an object with a 'messages' list (chat schema).")
                yield Conversation(check_messages(rec["messages"], where), where)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8.") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}); check that it is a readable (gzip-)JSONL file.") from None


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


def _tokenize_by_prefix(tokenizer, messages, eot_id):
    """Assistant spans from prefix renders, for templates without {% generation %} tags.

    The conversation is rendered once and tokenized once (with offsets); each assistant turn's
    span is [render(msgs[:i], generation prompt) , end of the first end-of-turn token after its
    content), so the template's own separators after the end-of-turn token stay unlabelled.
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    eot_text = tokenizer.convert_ids_to_tokens(eot_id)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        if not full.startswith(start_text):
            raise DataError("the chat template renders a conversation prefix differently from the whole; set data.chat_template to a named template.")
        content_at = full.find(m["content"], len(start_text))
        end = full.find(eot_text, content_at + len(m["content"])) if content_at >= 0 else -1
        end = end + len(eot_text) if end >= 0 else len(tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False))
        spans.append((len(start_text), end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= s and e <= b and e > s for a, b in spans)
        labels.append(tid if inside else IGNORE)
    return list(ids), labels


def truncate(ids: List[int], labels: List[int], max_len: int) -> Tuple[List[int], List[int]]:
    return ids[:max_len], labels[:max_len]
