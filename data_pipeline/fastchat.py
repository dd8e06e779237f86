"""Fast conversation tokenization that gives exactly what `chat.tokenize_conversation` gives.

The exact path renders every conversation with the Jinja chat template and tokenizes the text
with offsets to find the assistant tokens (~1,000 conversations/s). Here the template is read
once instead: rendering probe conversations with sentinel contents yields each role's text
before and after its content. A conversation is then assembled from pre-tokenized template
pieces and one tokenization per message of `<text after the last special token> + content`.

Why the result is identical, not approximate:
- special tokens are hard boundaries for the tokenizer, so the template text between two
  contents must contain one (checked when the skeleton is read) and the pieces between special
  tokens are tokenized exactly as the full render would be;
- the label span starts where the content starts: the joint tokens of `tail + content` must
  begin with the tokens of `tail` alone, otherwise (a merge across the boundary) that
  conversation takes the exact path; it ends with the end-of-turn token, which must open the
  template text after an assistant turn;
- contents that contain a special token's text, or have surrounding whitespace a template may
  strip, take the exact path;
- `FastEncoder.build` compares its output with the exact path on the first conversations of the
  data and is not used at all if a single token differs (mistral's template, for example, folds
  the system prompt into the first user turn and is refused when the skeleton is read).

Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style) are converted to tiktoken, whose BPE is
~3x faster than the Rust `tokenizers` one here; the conversion is checked token for token on
the sample too, else the tokenizer's own backend is used.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .chat import IGNORE, tokenize_conversation

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SENTINEL = "Zq{}xQ"
_PROBE_ROLES = ("system", "user", "assistant", "user", "assistant")


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_encoder(tokenizer) -> Tuple[Optional[Callable[[str], List[int]]], str]:
    """(encode_ordinary, "") for a byte-level BPE tokenizer, else (None, why not)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "not a fast tokenizer"
    spec = json.loads(backend.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") or norm:
        return None, "not a byte-level BPE without normalizer"
    pattern = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            pattern = steps[0]["pattern"]["Regex"]
    if pattern is None:
        return None, "pre-tokenizer is not a byte-level regex split"
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    try:
        ranks = {bytes(u2b[c] for c in piece): i for piece, i in model["vocab"].items() if piece not in specials}
        enc = tiktoken.Encoding("dialtune-converted", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError) as e:
        return None, f"vocabulary does not convert ({e})"
    return enc.encode_ordinary, ""


class Skeleton:
    """Template text around each role's content, read off sentinel renders."""

    def __init__(self, first: Dict[str, str], before: Dict[str, str], after: Dict[str, str]):
        self.first, self.before, self.after = first, before, after

    @classmethod
    def read(cls, tokenizer) -> Tuple[Optional["Skeleton"], str]:
        def render(roles):
            msgs = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
            return tokenizer.apply_chat_template(msgs, tokenize=False)

        first, before, after = {}, {}, {}
        for roles in (_PROBE_ROLES, _PROBE_ROLES[1:]):
            prev = ""
            for k in range(1, len(roles) + 1):
                try:
                    text = render(roles[:k])
                except Exception as e:  # templates that refuse a shape (e.g. must end with user)
                    return None, f"the template cannot render a probe conversation ({e})"
                if not text.startswith(prev):
                    return None, "rendering a conversation prefix changes earlier text"
                block, prev = text[len(prev):], text
                sentinel = _SENTINEL.format(k - 1)
                if block.count(sentinel) != 1 or "Zq" in block.replace(sentinel, ""):
                    return None, "a message's content is not rendered once, in its own block"
                b, a = block.split(sentinel)
                role = roles[k - 1]
                if k == 1:
                    first[role] = b
                    after.setdefault(role, a)
                elif before.setdefault(role, b) != b:
                    return None, f"the text before a {role} turn depends on its position"
                if after.setdefault(role, a) != a:
                    return None, f"the text after a {role} turn depends on its position"
        return cls(first, before, after), ""


class FastEncoder:
    """`encode(messages) -> (ids, labels) or None` (None: take the exact path)."""

    def __init__(self, tokenizer, skeleton: Skeleton, eot_id: int, text_encode: Callable[[str], List[int]]):
        self.sk, self.eot = skeleton, eot_id
        self.text_encode = text_encode
        specials = sorted({t for t in tokenizer.all_special_tokens} | {t.content for t in tokenizer.added_tokens_decoder.values()},
                          key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._hf = tokenizer
        self._pieces: Dict = {}
        self._between: Dict = {}

    def _template(self, text: str, where: str) -> Optional[Tuple[List[int], str, List[int]]]:
        """Template text before the first content, between two contents or after the last ->
        (tokens up to its last special token, the tail text that joins the next content, tokens of
        that tail alone). None where a content would not end at a special token."""
        key = (text, where)
        if key not in self._pieces:
            found = list(self._special_re.finditer(text)) if self._special_re else []
            if where != "first" and text and (not found or found[0].start() != 0):
                piece = None  # the previous content would join this text
            elif where == "last":
                piece = (self._hf.encode(text, add_special_tokens=False), "", [])
            else:
                cut = found[-1].end() if found else 0
                tail = text[cut:]
                piece = (self._hf.encode(text[:cut], add_special_tokens=False) if cut else [], tail,
                         self.text_encode(tail) if tail else [])
            self._pieces[key] = piece
        return self._pieces[key]

    def encode(self, messages: Sequence[Dict[str, str]]) -> Optional[Tuple[List[int], List[int]]]:
        sk, pieces = self.sk, self._between
        prev = None
        ids: List[int] = []
        labels: List[int] = []
        for m in messages:
            content, role = m["content"], m["role"]
            piece = pieces.get((prev, role), False)
            if piece is False:
                if prev is None:
                    text = sk.first.get(role)
                    piece = self._template(text, "first") if text is not None else None
                else:
                    text = sk.after[prev] + sk.before[role] if prev in sk.after and role in sk.before else None
                    piece = self._template(text, "between") if text is not None else None
                pieces[(prev, role)] = piece
            if piece is None or content[:1].isspace() or content[-1:].isspace() or (
                    self._special_re and self._special_re.search(content)):
                return None
            const, tail, head = piece
            ids += const
            labels += _const_labels(const, prev == "assistant")
            joint = self.text_encode(tail + content) if tail else self.text_encode(content)
            ids += joint
            if role == "assistant":
                if joint[:len(head)] != head:
                    return None  # a token straddles the template/content boundary
                labels += [IGNORE] * len(head)
                labels += joint[len(head):]
            else:
                labels += [IGNORE] * len(joint)
            prev = role
        end = self._template(sk.after[prev], "last")
        if end is None:
            return None
        ids += end[0]
        labels += _const_labels(end[0], prev == "assistant")
        return ids, labels

    @classmethod
    def build(cls, tokenizer, eot_id: int, sample: Sequence[Sequence[Dict[str, str]]]) -> Tuple[Optional["FastEncoder"], str]:
        """A verified encoder, or (None, why it is not used)."""
        skeleton, why = Skeleton.read(tokenizer)
        if skeleton is None:
            return None, why
        eot_text = tokenizer.convert_ids_to_tokens(eot_id)
        if "assistant" not in skeleton.after or not eot_text or not skeleton.after["assistant"].startswith(eot_text):
            return None, "the text after an assistant turn does not start with the end-of-turn token"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None, "not a fast tokenizer"

        def hf_encode(text):
            return backend.encode(text, add_special_tokens=False).ids

        fast, why_not_tt = tiktoken_encoder(tokenizer)
        contents = [m["content"] for conv in sample for m in conv][:2000]
        if fast is not None and any(fast(c) != hf_encode(c) for c in contents):
            fast, why_not_tt = None, "the converted tokenizer differs on the data"
        enc = cls(tokenizer, skeleton, eot_id, fast or hf_encode)
        enc.backend = "tiktoken" if fast else f"tokenizers ({why_not_tt})"
        for conv in sample:
            got = enc.encode(conv)
            if got is not None and tuple(got) != tuple(tokenize_conversation(tokenizer, conv, eot_id)):
                return None, "its output differs from the chat template's on the data"
        return enc, ""


def _const_labels(const: List[int], after_assistant: bool) -> List[int]:
    """Template tokens are not targets, except the end-of-turn token that closes an assistant
    turn (`build` checked that it opens the template text after one)."""
    if after_assistant:
        return const[:1] + [IGNORE] * (len(const) - 1)
    return [IGNORE] * len(const)
