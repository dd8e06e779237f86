"""Metrics of the eval suite (train/evaluate.py) on plain Python values, checkable by hand:
intent classification report, response text metrics (chrF, BLEU, ROUGE-L), loop detection."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple


def classification_report(y_true: Sequence[str], y_pred: Sequence[Optional[str]], labels: Sequence[str]) -> Dict:
    """Accuracy, macro-F1 over `labels` and per-class precision/recall/F1/support. A prediction
    outside the label set (None, empty, unknown text) counts as wrong and as `unknown`."""
    per = {}
    for c in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[c] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    present = [c for c in labels if per[c]["support"] > 0] or list(labels)
    label_set = set(labels)
    n = len(y_true)
    return {"accuracy": sum(1 for t, p in zip(y_true, y_pred) if t == p) / max(n, 1),
            "macro_f1": sum(per[c]["f1"] for c in present) / max(len(present), 1),
            "n": n, "unknown": sum(1 for p in y_pred if p not in label_set), "per_class": per}


def text_metrics(hyps: Sequence[str], refs: Sequence[str]) -> Dict[str, float]:
    """Corpus chrF and BLEU (sacrebleu, 0-100) and mean ROUGE-L F (rouge-score, 0-100).
    rouge-score tokenizes on ASCII letters and digits only, so it is ~0 for Chinese text; chrF
    works on characters in any script."""
    import logging

    import sacrebleu
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs each tokenizer choice

    if not hyps:
        return {"chrf": 0.0, "bleu": 0.0, "rougeL": 0.0}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    return {"chrf": sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score,
            "bleu": sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score,
            "rougeL": 100.0 * rouge}


def repeats(tokens: Sequence[int], n: int = 4, times: int = 3) -> bool:
    """True when some n-gram of tokens occurs `times` or more: the generation loops."""
    seen: Dict[Tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        g = tuple(tokens[i:i + n])
        seen[g] = seen.get(g, 0) + 1
        if seen[g] >= times:
            return True
    return False


def normalise_label(text: str) -> str:
    return " ".join(text.strip().strip(".").split()).lower()


def md_fence(text: str) -> str:
    """A Markdown code block that shows `text` verbatim: its fence is longer than any run of
    backticks in it (a generation may well hold ``` itself)."""
    import re

    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"
