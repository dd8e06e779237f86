"""One validation pass over every record, before anything trains on it.

`clean()` checks one conversation and applies the configured repair policies; `Report` counts
problems per reason with example locations. `data.on_error=strict` stops at the first
`data.max_errors_shown` problems with `file:line: what is wrong`; `lenient` skips bad records
and prints a table of counts per reason.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from typing import Dict, List, Union

from .records import Problem

ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one: JSON's "\\ud800" escape (a pair decodes to one character)


def is_blank(text: str) -> bool:
    """Whitespace and invisible format characters only (Unicode category Cf: zero-width space and
    joiners, U+200E/U+200F direction marks, bidi controls, word joiner, BOM, soft hyphen ...)."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def clean(messages: List, policy, fixes: Counter) -> Union[List[Dict[str, str]], Problem]:
    """Checked and repaired messages, or the Problem that makes the record unusable."""
    if not messages:
        return Problem("empty_conversation", "the conversation has no messages")
    out: List[Dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return Problem("bad_type", f"messages[{i}] must be an object with 'role' and 'content'")
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            return Problem("missing_key", f"messages[{i}] has no '{missing}'")
        role, content = m["role"], m["content"]
        if role is None or content is None:
            return Problem("null_value", f"messages[{i}] has a null {'role' if role is None else 'content'}")
        if not isinstance(role, str):
            return Problem("bad_type", f"messages[{i}] 'role' must be text, got {type(role).__name__}")
        if not isinstance(content, str):
            return Problem("bad_type", f"messages[{i}] 'content' must be text, got {type(content).__name__}" + (
                " (content parts such as [{'type': 'text', 'text': ...}] are not read: join their text into one string)"
                if isinstance(content, list) else ""))
        if not content.isascii() and (bad := _SURROGATE.search(content)):
            return Problem("lone_surrogate", f"messages[{i}] ({role}) holds a lone surrogate, \\u{ord(bad.group()):04x} at "
                           f"character {bad.start()}, which is no character and cannot be written as UTF-8; fix that \\u "
                           "escape (a character above U+FFFF is a pair, such as \\ud83d\\ude00) or remove it")
        if role not in ROLES:
            return Problem("unknown_role", f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        if is_blank(content):
            return Problem("empty_content", f"messages[{i}] ({role}) is empty or whitespace/zero-width only")
        if role == "system" and i != 0:
            return Problem("system_not_first", f"messages[{i}] is a system message; a system message may only come first")
        weight = m.get("weight")  # null is no weight: Arrow (Parquet, saved datasets) gives every message every key
        if weight is not None and role != "assistant":
            return Problem("bad_weight", f"messages[{i}] ({role}) has a weight; only assistant messages take one (0: context "
                           "only, not trained on; 1: trained on)")
        weight = 1 if weight is None else weight
        if weight not in (0, 1) or not isinstance(weight, (int, float)):  # (True/False are 1/0, as in OpenAI's format)
            return Problem("bad_weight", f"messages[{i}] has weight {weight!r}; use 0 (context only, not trained on) or 1")
        if len(content) > policy.max_message_chars:
            if policy.long_message == "drop":
                return Problem("message_too_long", f"messages[{i}] has {len(content)} characters > data.max_message_chars={policy.max_message_chars}")
            content = content[: policy.max_message_chars]
            fixes["truncated_long_message"] += 1
        if role == "assistant" and content[:1].isspace():
            # a reply's leading whitespace would merge with the template's header into one token (Qwen's "\n "),
            # trained as a target, that no generation prompt ever ends with
            content = content.lstrip()
            fixes["stripped_reply_whitespace"] += 1
        if out and out[-1]["role"] == role:
            if policy.same_role == "reject":
                return Problem("consecutive_same_role", f"messages[{i - 1}] and [{i}] are both {role}; roles must alternate (or set data.same_role=merge)")
            if out[-1].get("weight", 1) != weight:
                return Problem("bad_weight", f"messages[{i - 1}] and [{i}] are consecutive assistant turns with different weights, "
                               "which cannot be merged into one turn; give them one weight, or put a user turn between them")
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + content}
            fixes["merged_same_role"] += 1
            continue
        out.append({"role": role, "content": content, "weight": 0} if not weight else {"role": role, "content": content})
    if out[-1]["role"] == "user":
        if policy.trailing_user == "reject":
            return Problem("trailing_user", "the conversation ends with a user turn, which nothing answers (or set data.trailing_user=trim)")
        while out and out[-1]["role"] != "assistant":
            out.pop()
        fixes["trimmed_trailing_user"] += 1
    if not any(m["role"] == "assistant" for m in out):
        return Problem("no_assistant", "the conversation has no assistant turn, so there is nothing to learn")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        return Problem("no_target", "every assistant turn has weight 0, so there is nothing to learn")
    return out


class Report:
    """Problems per reason, with example locations; raises in strict mode."""

    def __init__(self, on_error: str = "strict", max_shown: int = 5):
        self.on_error, self.max_shown = on_error, max_shown
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)
        self.fixes: Counter = Counter()
        self.errors: List[str] = []
        self.read = 0
        self.kept = 0
        self.source_reads: Counter = Counter()  # records read per source (its index in sources_of)
        self.finished = False  # every source read to its end

    def problem(self, where: str, p: Problem) -> None:
        self.counts[p.reason] += 1
        if len(self.examples[p.reason]) < 3:
            self.examples[p.reason].append(where)
        if self.on_error == "strict":
            self.errors.append(f"{where}: {p.message}.")
            if len(self.errors) >= self.max_shown:
                self.raise_errors()

    def raise_errors(self) -> None:
        from .chat import DataError

        if self.errors:
            stopped = f"stopped after {self.max_shown} errors; " if len(self.errors) >= self.max_shown else ""
            them = "them" if len(self.errors) > 1 else "it"
            raise DataError("\n".join(self.errors) + f"\n({stopped}fix {them}, or set data.on_error=lenient to skip bad records)")

    def table(self) -> str:
        if not self.counts:
            return "no problems found"
        rows = ["| reason | records | examples |", "|---|---:|---|"]
        for reason, n in self.counts.most_common():
            rows.append(f"| {reason} | {n} | {', '.join(self.examples[reason])} |")
        return "\n".join(rows)

    def as_dict(self) -> Dict:
        return {"records_read": self.read, "records_kept": self.kept, "skipped": dict(self.counts),
                "skipped_examples": dict(self.examples), "repaired": dict(self.fixes)}


def counts_text(by_reason: Dict[str, int]) -> str:
    """{"invalid_json": 3, "no_assistant": 1} as "3 invalid_json, 1 no_assistant", most first."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items(), key=lambda x: -x[1]))
