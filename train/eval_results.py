"""The eval suite's results, written and shown: results.json and the samples files of a run's
eval/ directory, the scalars logged to metrics.jsonl and W&B, and the terminal tables. (The suite
itself, which produces the results dict: train/evaluate.py.)"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

BASE_LM = "base_lm.json"  # a full fine-tune's base rows, measured before its first step

from .eval_metrics import md_fence


def lm_rows(res: Dict) -> List[Dict]:
    """The held-out LM rows to show: with a single eval source its row repeats "all" and goes."""
    rows = (res.get("lm") or {}).get("rows") or []
    if sum(1 for r in rows if r["model"] == "fine-tuned") == 2:
        rows = [r for r in rows if r["source"] == "all"]
    return rows


def scalars(res: Dict) -> Dict[str, float]:
    """The metrics.jsonl / W&B scalars of a suite result (eval/loss keeps its historic name)."""
    out = {}
    for row in lm_rows(res):
        prefix = "eval" if row["model"] == "fine-tuned" else "eval_base"
        suffix = "" if row["source"] == "all" else f"/{row['source']}"
        out[f"{prefix}/loss{suffix}"] = row["loss"]
        if row["source"] == "all":
            out[f"{prefix}/ppl"] = row["ppl"]
            out[f"{prefix}/target_tokens"] = row["target_tokens"]
    for mode, r in res.get("intent", {}).items():
        out.update({f"eval/intent/{mode}/accuracy": r["accuracy"], f"eval/intent/{mode}/macro_f1": r["macro_f1"],
                    f"eval/intent/{mode}/unknown": r["unknown"]})
    for dec, r in res.get("response", {}).items():
        out.update({f"eval/response/{dec}/{k}": v for k, v in r.items() if k != "n"})
    return out


def write(res: Dict, out_dir: str, step: Optional[int], checkpoint: str) -> Dict[str, str]:
    """results.json, samples.jsonl and samples.md under out_dir (rank 0 calls this)."""
    os.makedirs(out_dir, exist_ok=True)
    samples = res.get("samples", [])
    body = {"step": step, "checkpoint": checkpoint, **{k: v for k, v in res.items() if k != "samples"}}
    paths = {"results": os.path.join(out_dir, "results.json")}
    tmp = paths["results"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=2)
    os.replace(tmp, paths["results"])
    if not samples:  # no response part this time: the previous samples would pass for this result's
        for name in ("samples.jsonl", "samples.md"):
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    else:
        paths["samples"] = os.path.join(out_dir, "samples.jsonl")
        with open(paths["samples"], "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        paths["samples_md"] = os.path.join(out_dir, "samples.md")
        with open(paths["samples_md"], "w", encoding="utf-8") as f:
            f.write(f"# Eval samples (step {step})\n\n")
            for k, s in enumerate(samples, 1):
                f.write(f"## {k}. {s['decoding']}{'' if s['stopped'] else ' (did not stop)'}\n\n"
                        f"**Context**\n\n{md_fence(s['context'])}\n\n**Reference**\n\n{md_fence(s['reference'])}\n\n"
                        f"**Generation**\n\n{md_fence(s['generation'])}\n\n")
    return paths


def tables_text(res: Dict) -> str:
    """Plain-text tables of a suite result, for the terminal."""
    lines = []
    if "lm" in res:
        lines.append("held-out LM (target tokens):")
        lines.append(f"  {'model':<11} {'source':<32} {'loss':>8} {'ppl':>10} {'tokens':>9}")
        for r in lm_rows(res):
            lines.append(f"  {r['model']:<11} {r['source'][:32]:<32} {r['loss']:>8.4f} {r['ppl']:>10.2f} {r['target_tokens']:>9}")
    for mode, r in res.get("intent", {}).items():
        lines.append(f"intent ({mode}): accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}, n {r['n']}, unknown {r['unknown']}")
        worst = sorted(((c, v) for c, v in r["per_class"].items() if v["support"]), key=lambda kv: kv[1]["f1"])[:5]
        lines += ["  lowest F1:"] * bool(worst) + [f"    {c[:40]:<40} P {v['precision']:.2f} R {v['recall']:.2f} F1 {v['f1']:.2f} (n {v['support']})" for c, v in worst]
    for dec, r in res.get("response", {}).items():
        lines.append(f"response ({dec}): chrF {r['chrf']:.1f}, BLEU {r['bleu']:.1f}, ROUGE-L {r['rougeL']:.1f}, "
                     f"stopped {r['stopped_share']:.0%}, looping {r['repetition_share']:.0%}, {r['mean_words']:.1f} words, n {r['n']}")
    return "\n".join(lines)


def earlier_dir(parent: str, when: float) -> str:
    """A new folder parent/earlier-<when, local time>[-N] for results set aside; returns its path."""
    import time

    stamp = os.path.join(parent, "earlier-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(when)))
    kept, n = stamp, 1
    while os.path.exists(kept):  # two set aside within a second
        n += 1
        kept = f"{stamp}-{n}"
    os.makedirs(kept)
    return kept


def keep_earlier(out_dir: str) -> Optional[str]:
    """Move the results already in out_dir (results.json, samples.jsonl/.md; e.g. the end of
    training's, which `dialtune eval` would replace) into out_dir/earlier-<their time>/; returns
    that folder, or None when there were none."""
    results = os.path.join(out_dir, "results.json")
    if not os.path.isfile(results):
        return None
    kept = earlier_dir(out_dir, os.path.getmtime(results))
    for name in ("results.json", "samples.jsonl", "samples.md"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(kept, name))
    return kept


def write_base_rows(eval_dir: str, rows: List[Dict]) -> None:
    """A full fine-tune's base LM rows (measured before step 1) to <eval_dir>/base_lm.json, atomically."""
    path = os.path.join(eval_dir, BASE_LM)
    os.makedirs(eval_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(path + ".tmp", path)


def read_base_rows(eval_dir: str) -> Optional[List[Dict]]:
    """The base LM rows write_base_rows left in eval_dir; None when there are none (or unreadable)."""
    try:
        with open(os.path.join(eval_dir, BASE_LM)) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return None
    return [r for r in rows if isinstance(r, dict) and r.get("model") == "base"] if isinstance(rows, list) else None
