"""What the data lost or leaks, said from the stats of a build or a cache hit alike (data_warnings):
skipped records, truncated or dropped conversations, sources that give nothing, eval conversations
that are also trained on."""
from __future__ import annotations

from typing import Dict, List

from .validate import counts_text

TRUNCATED_WARN_SHARE = 0.10  # warn when more of the conversations than this were truncated (the bundled sample: 5.4% at 512)


def data_warnings(stats: Dict) -> List[str]:
    """One line per thing the data lost or leaks (skipped records, truncated or dropped
    conversations, a source that gives a set nothing, eval conversations that are also trained on), from the stats of a build or a
    cache hit alike; `prepare_cached` logs them, so training, `dialtune prepare` and
    `dialtune eval` all say them, every time."""
    out = []
    v, t, max_len = stats["validation"], stats["truncation"], stats["max_seq_len"]
    skipped, read = sum(v["skipped"].values()), v["records_read"]
    if skipped:
        out.append(f"warning: {skipped} of {read} records ({skipped / max(1, read):.1%}) were skipped as invalid "
                   f"({counts_text(v['skipped'])}; data.on_error=lenient); fix them, or run with data.on_error=strict to list each with file:line.")
    n = v["records_kept"]  # every kept record is tokenized
    if t["dropped"]:
        out.append(f"warning: {t['dropped']} of {n} conversations ({t['dropped'] / max(1, n):.1%}) were dropped as longer than "
                   f"data.max_seq_len={max_len} tokens (data.truncation={t['policy']}"
                   + ("" if t["policy"] == "drop" else ", and no assistant turn with its context fits")
                   + (f"; {'first ' if t['dropped'] > 3 else ''}at {', '.join(t['dropped_where'])}" if t.get("dropped_where") else "")
                   + "); raise data.max_seq_len" + (" or use data.truncation=keep_recent." if t["policy"] == "drop" else "."))
    if t["truncated_share"] > TRUNCATED_WARN_SHARE:
        weighted = any(s["weight"] != 1.0 for s in stats.get("train", {}).get("sources", {}).values())
        out.append(f"warning: {t['truncated']} of {t.get('built', n)} conversations ({t['truncated_share']:.1%}) "
                   + ("in the training set (after the sources' weights) and the held-out set " if weighted else "")
                   + f"were truncated to data.max_seq_len={max_len} tokens (data.truncation={t['policy']}"
                   + (f"; {t['cut']} of them cut inside a turn, as not even their last user turn and reply fit" if t.get("cut") else "")
                   + "), so the turns cut from them count in neither training nor the held-out loss; "
                   "raise data.max_seq_len, or set data.truncation=drop to leave them out.")
    for name in ("train", "eval"):
        for path, s in stats.get(name, {}).get("sources", {}).items():
            if e := s.get("empty"):
                out.append(f"warning: {path} gives the {'training' if name == 'train' else 'held-out'} set no conversation ("
                           + ("it holds no records" if not e["records"] else f"of its {e['records']} record{'s' * (e['records'] != 1)}, " + ", ".join(
                               f"{c} {what}" for c, what in (
                                   (e["records"] - e["valid"], "skipped as invalid (data.on_error=lenient)"),
                                   (e["held_out"], "held out for eval (data.eval_fraction)"),
                                   (e["dropped"], f"longer than data.max_seq_len={max_len} (dropped)"),
                                   (e["unrenderable"], "not renderable by the chat template")) if c))
                           + "); fix the file, or remove it from the data config.")
    for path, s in stats.get("train", {}).get("sources", {}).items():
        if s.get("unweighted") and not s["conversations"]:
            out.append(f"warning: data.sources weight {s['weight']} draws none of the {s['unweighted']} training conversations "
                       f"of {path}; raise its weight to at least {1 / (2 * s['unweighted']):.2g}, or remove the source.")
    u = stats.get("unrenderable") or {}
    if u.get("count"):
        out.append(f"warning: {u['count']} conversation(s) the chat template cannot render were skipped (data.on_error=lenient; "
                   f"{'first ' if u['count'] > 3 else ''}at {', '.join(u['where'])}); data.on_error=strict names the template's error.")
    o = stats.get("overlap") or {}
    if o.get("eval_in_train"):
        out.append(f"warning: {o['eval_in_train']} of {o['eval_conversations']} eval conversations also occur in training "
                   f"(eval: {', '.join(o['eval_files'])}; train: {', '.join(o['train_files'])}), so the eval loss on them is "
                   "in-sample; remove them from one side.")
    return out
