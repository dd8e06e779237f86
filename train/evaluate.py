"""The customer-service eval suite, inside training (every `eval.every_n_steps`) and in `dialtune eval`.

Parts (`eval.during_training`, `eval.at_end`):
- lm: token-weighted held-out loss and perplexity on target tokens, overall and per source; at
  the end also with the adapter disabled (the base), for a base vs fine-tuned table.
- intent: labelled utterances ({"text","label"}) rendered like intent training records; scored
  by constrained choice (the log-likelihood of each label's tokens plus the end-of-turn token,
  highest wins) and by free greedy generation matched to the label set (anything else counts as
  unknown); accuracy, macro-F1 and per-class precision/recall/F1.
- response: the last assistant turn of held-out conversations generated from its context
  (greedy and/or sampled) and scored against the reference with sacrebleu (chrF, BLEU) and
  rouge-score (ROUGE-L F), plus whether generation stopped at a stop token and whether it looped.

Rank-aware: every part shards its examples over the ranks with padding, so each rank runs the
same number of forwards and generate() calls (ZeRO-3 gathers parameters collectively, and
generate runs with synced_gpus there), and results are gathered on every rank.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from data_pipeline import batching
from data_pipeline.chat import IGNORE, DataError, tokenize_conversation

from . import distributed
from .eval_metrics import classification_report, normalise_label, repeats, text_metrics
from .generation import PromptTooLong, _left_pad, generate, prompt_ids, stop_ids_of

PARTS = ("lm", "intent", "response")


# ---------------------------------------------------------------------------------------------
# Sharding and gathering


def shard(n: int, world: int, rank: int) -> List[int]:
    """This rank's indices of n items; -1 pads every rank to the same count (result discarded)."""
    per = -(-n // world) if n else 0
    idx = list(range(n)) + [-1] * (per * world - n)
    return idx[rank * per:(rank + 1) * per]


def gather(obj: Any, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------------------
# Scoring and generation primitives


@torch.no_grad()
def sequence_logprobs(forward: Callable, batch: Dict[str, torch.Tensor], dev) -> Tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the target tokens, their count) per row."""
    out = forward(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), use_cache=False)
    labels = batch["labels"][:, 1:].to(dev)
    ce = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return -ce.sum(1).double().cpu(), (labels != IGNORE).sum(1).cpu()


@torch.no_grad()
def tail_logprobs(forward: Callable, seqs: List[Dict[str, List[int]]], pad_id: int, dev) -> List[float]:
    """Summed log-probability of each sequence's targets, which all sit at its end (a label and
    its end-of-turn token): rows are left-padded with explicit position ids, so the output
    projection runs only over the last positions (logits_to_keep) - the vocabulary-sized
    logits of the prompt are never computed."""
    first = [next((i for i, t in enumerate(q["labels"]) if t != IGNORE), len(q["labels"])) for q in seqs]
    keep = max(len(q["input_ids"]) - f for q, f in zip(seqs, first)) + 1
    ids, mask = _left_pad([q["input_ids"] for q in seqs], pad_id)
    labels, _ = _left_pad([q["labels"] for q in seqs], IGNORE)
    width = ids.shape[1]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = forward(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), logits_to_keep=keep,
                  use_cache=False)
    logits = out.logits[:, -keep:-1].float()  # predicts the last keep-1 tokens
    tgt = labels[:, width - keep + 1:].to(dev)
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    return (-ce.sum(1)).tolist()


# ---------------------------------------------------------------------------------------------
# The parts


@torch.no_grad()
def lm_eval(forward: Callable, ds, source_names: List[str], pad_id: int, mb: int, world: int, rank: int, dev,
            max_batches: int = 0, progress: bool = False) -> Dict:
    """Held-out loss per source: {"all": {...}, "<source>": {...}} of loss, ppl, target_tokens."""
    plan = batching.eval_micro_batches(len(ds), mb, world, rank)
    if max_batches:
        plan = plan[:max_batches]
    sums = [0.0] * (2 * len(source_names))
    bar = _progress(len(plan), "eval lm", progress)
    for idx in plan:
        rows = batching.fetch(ds, idx)
        sources = ds[[i if i >= 0 else 0 for i in idx]]["source"]
        lp, n = sequence_logprobs(forward, batching.collate(rows, pad_id), dev)
        for k, i in enumerate(idx):
            if i >= 0:
                sums[2 * sources[k]] += -float(lp[k])
                sums[2 * sources[k] + 1] += int(n[k])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    sums = distributed.all_sum(sums, dev)
    out = {}
    total, count = sum(sums[0::2]), sum(sums[1::2])
    for name, (s, c) in [("all", (total, count))] + [(n, (sums[2 * k], sums[2 * k + 1])) for k, n in enumerate(source_names)]:
        if c > 0:
            loss = s / c
            out[name] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "target_tokens": int(c)}
    return out


def load_intents(files: Sequence[str], intent_cfg, max_examples: int,
                 only_labels: Sequence[str] = ()) -> Tuple[List[Tuple[List[Dict], str]], List[str]]:
    """[(prompt messages, gold label)] and the sorted label set, from {"text","label"} files.
    Above max_examples, a fixed random sample of that many (seed 0, the same on every rank and run)
    is scored, not the first ones: a file sorted by label would be scored on one or two labels. With
    only_labels (eval.intent_labels), the examples of other labels are left out before the sample is
    taken: they could only be scored wrong and would cap the accuracy."""
    from data_pipeline.records import Problem, read_records, to_messages

    examples = []
    for path in files:
        if not os.path.exists(path):
            raise DataError(f"eval.intent_files: {path!r} does not exist; check the path.")
        for where, rec in read_records(path):
            conv = rec if isinstance(rec, Problem) else to_messages(rec, "intent", intent_cfg)
            if isinstance(conv, Problem):
                raise DataError(f"{where}: {conv.message} (eval.intent_files takes {{\"text\", \"label\"}} records).")
            messages = conv[0]
            if not messages[-1]["content"].strip() or not str(rec.get("text", "")).strip():
                raise DataError(f"{where}: the {'label' if not messages[-1]['content'].strip() else 'text'} is empty; "
                                "give every utterance its text and label, or leave the line out.")
            examples.append((messages[:-1], messages[-1]["content"]))
    if not examples:
        raise DataError(f"eval.intent_files {list(files)} hold no labelled utterance.")
    if only_labels:
        wanted = set(only_labels)
        examples = [e for e in examples if e[1] in wanted]
        if not examples:
            raise DataError(f"eval.intent_files {list(files)} hold no utterance labelled with one of eval.intent_labels "
                            f"{list(only_labels)}; check the label names.")
    labels = sorted({label for _, label in examples})
    return fixed_sample(examples, max_examples), labels


def fixed_sample(items: List, n: int) -> List:
    """A fixed random sample of n items (seed 0: the same on every rank and run), in their order -
    files are often sorted (by label, by source), so the first n would stand for few of them; all
    items when n is 0 or covers them."""
    if not n or len(items) <= n:
        return list(items)
    import random

    return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), n))]


def intent_eval(model, forward: Callable, tokenizer, eot: int, examples, labels: List[str], modes: Sequence[str],
                batch_size: int, world: int, rank: int, dev, synced: bool, fast=None, progress: bool = False) -> Dict:
    mine = shard(len(examples), world, rank)
    todo = [examples[i if i >= 0 else 0] for i in mine]
    preds: Dict[str, List[Optional[str]]] = {}
    if "loglik" in modes:
        seqs = []
        for prompt, _ in todo:
            for label in labels:
                conv = list(prompt) + [{"role": "assistant", "content": label}]
                got = fast.encode(conv) if fast is not None else None
                ids, lab = got if got is not None else tokenize_conversation(tokenizer, conv, eot)
                seqs.append({"input_ids": ids, "labels": lab})
        scores = []
        bar = _progress(-(-len(seqs) // batch_size), "eval intent (log-likelihood)", progress)
        for s in range(0, len(seqs), batch_size):
            scores.extend(tail_logprobs(forward, seqs[s:s + batch_size], tokenizer.pad_token_id, dev))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        L = len(labels)
        preds["loglik"] = [labels[max(range(L), key=lambda j: scores[k * L + j])] for k in range(len(todo))]
    if "generate" in modes:
        by_norm = {normalise_label(label): label for label in labels}
        longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
        out = []
        for s in range(0, len(todo), batch_size):
            prompts = [prompt_ids(tokenizer, p, 0) for p, _ in todo[s:s + batch_size]]
            for toks, _ in generate(model, tokenizer, prompts, dev, longest + 4, stop_ids_of(tokenizer, eot), synced=synced):
                out.append(by_norm.get(normalise_label(tokenizer.decode(toks, skip_special_tokens=True))))
        preds["generate"] = out
    result = {}
    for mode, p in preds.items():
        pairs = [(examples[i][1], p[k]) for k, i in enumerate(mine) if i >= 0]
        pairs = [x for part in gather(pairs, world) for x in part]
        result[mode] = classification_report([t for t, _ in pairs], [q for _, q in pairs], labels)
    return result


def response_eval(model, tokenizer, eot: int, conversations: List[Dict], cfg, max_len: int, world: int, rank: int,
                  dev, synced: bool, progress: bool = False) -> Tuple[Dict, List[Dict]]:
    """Generate the last assistant turn of a fixed random sample of eval.response_conversations
    conversations (fixed_sample: the eval set is sorted by source) from its context; metrics and
    samples. A context longer than data.max_seq_len - eval.max_new_tokens is shortened by
    prompt_ids; a budget too small for the template itself is a ConfigError, on every rank alike."""
    from .config import ConfigError

    items = []
    for c in conversations:
        msgs = c["messages"]
        j = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if j > 0 and any(m["role"] == "user" for m in msgs[:j]):
            items.append((msgs[:j], msgs[j]["content"]))
    items = fixed_sample(items, cfg.response_conversations)
    budget = max_len - cfg.max_new_tokens
    fix = "lower eval.max_new_tokens or raise data.max_seq_len (or leave response out of the eval parts)"
    if budget <= 0:
        raise ConfigError(f"eval.max_new_tokens={cfg.max_new_tokens} leaves no room for a response prompt in "
                          f"data.max_seq_len={max_len}; {fix}.")
    try:  # every prompt, on every rank: a refusal is the same everywhere, before any rank generates
        prompts = [prompt_ids(tokenizer, ctx, budget) for ctx, _ in items]
    except PromptTooLong as e:
        raise ConfigError(f"eval.max_new_tokens={cfg.max_new_tokens} leaves {budget} of data.max_seq_len={max_len} tokens "
                          f"for a response prompt, fewer than the {e.need} a held-out conversation's chat template, system "
                          f"message and headers take; {fix}.") from None
    mine = shard(len(items), world, rank)
    todo = [prompts[i if i >= 0 else 0] for i in mine]
    metrics, samples = {}, []
    # a sampled answer draws from its own generator, seeded by eval.seed and the conversation's place in
    # the list, so it is the same whatever the ranks or eval.batch_size; the training RNG is not touched
    for decoding in cfg.decoding:
        gens = []
        bar = _progress(-(-len(todo) // cfg.batch_size), f"eval response ({decoding})", progress)
        for s in range(0, len(todo), cfg.batch_size):
            gens.extend(generate(model, tokenizer, todo[s:s + cfg.batch_size], dev, cfg.max_new_tokens, stop_ids_of(tokenizer, eot),
                                 sample=decoding == "sampled", temperature=cfg.temperature, top_p=cfg.top_p, synced=synced,
                                 seeds=[cfg.seed * 1_000_003 + max(i, 0) for i in mine[s:s + cfg.batch_size]]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        rows = [(i, tokenizer.decode(t, skip_special_tokens=True).strip(), stopped, repeats(t))
                for (t, stopped), i in zip(gens, mine) if i >= 0]
        rows = sorted((x for part in gather(rows, world) for x in part), key=lambda r: r[0])
        hyps, refs = [r[1] for r in rows], [items[r[0]][1] for r in rows]
        metrics[decoding] = {**text_metrics(hyps, refs), "n": len(rows),
                             "stopped_share": sum(r[2] for r in rows) / max(len(rows), 1),
                             "repetition_share": sum(r[3] for r in rows) / max(len(rows), 1),
                             "mean_words": sum(len(h.split()) for h in hyps) / max(len(rows), 1)}
        for r in rows[:cfg.samples]:
            ctx = items[r[0]][0]
            samples.append({"context": "\n".join(f"{m['role']}: {m['content']}" for m in ctx[-4:]),
                            "reference": items[r[0]][1], "generation": r[1], "decoding": decoding,
                            "stopped": r[2], "repeats": r[3]})
    return metrics, samples


# ---------------------------------------------------------------------------------------------
# The suite


def parts_at(ev, step: int, save_every: int, export_best: bool, final: bool, preempted: bool) -> Tuple[List[str], List[str]]:
    """The eval parts a training step runs: (before its checkpoint, after it).

    At the end only the held-out loss (the best checkpoint's measure) runs before the save, the other
    parts (they generate: slow, memory-hungry) after it, so they cannot cost the weights, and not once
    signalled (time is short: `dialtune eval`). Signalled at an eval step, only the held-out loss that
    early stopping or export.checkpoint=best rests on runs (a resumed run would never measure it).
    """
    due = bool(ev.every_n_steps) and step % ev.every_n_steps == 0
    on_grid = bool(save_every) and step % save_every == 0
    decides = "lm" in ev.during_training and bool(ev.early_stopping_patience or export_best and on_grid)
    if final:
        parts = ["lm"] if "lm" in ev.at_end else []
    elif preempted and due:
        parts = ["lm"] if decides else []
    else:
        parts = list(ev.during_training) if due else []
    late = [p for p in ev.at_end if p != "lm"] if final and not preempted else []
    return parts, late


def source_names(paths: Sequence[str]) -> List[str]:
    """Short, unique names for per-source metrics (file name without extensions)."""
    names = []
    for p in paths:
        base = os.path.basename(os.path.normpath(p))
        for ext in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
            base = base[:-len(ext)] if base.endswith(ext) else base
        names.append(base if base not in names and base != "all" else f"{base}_{len(names)}")  # "all": the overall row
    return names


def _same_tokens_only(rows: List[Dict], base_rows: List[Dict]) -> List[Dict]:
    """The base rows measured earlier that read the tokens this evaluation read (same source, same
    target-token count): another eval set or eval.lm_max_batches would compare different tokens."""
    tuned = {r["source"]: r.get("target_tokens") for r in rows if r.get("model") == "fine-tuned"}
    kept = [r for r in base_rows if tuned.get(r.get("source")) == r.get("target_tokens")]
    if len(kept) < len(base_rows):
        logging.getLogger("dialtune").warning(
            "the base rows measured before training read other tokens than this evaluation (another eval set or "
            "eval.lm_max_batches) and are left out")
    return kept


def run_suite(parts: Sequence[str], *, model, forward: Callable, tokenizer, eot: int, cfg, eval_ds, sources: List[str],
              conversations: List[Dict], pad_id: int, micro_batch_size: int, max_len: int, world: int, rank: int, dev,
              synced: bool = False, base_ctx: Optional[Callable] = None, fast=None, progress: bool = False,
              intent_cfg=None, base_rows: Optional[List[Dict]] = None) -> Dict:
    """Run the asked parts; the results dict that results.json holds (identical on every rank).
    The base model's held-out LM rows come from running the model under base_ctx (an adapter
    switched off), or as base_rows, measured earlier (a full fine-tune's base, before step 1; kept
    where they read the same tokens)."""
    was_training = model.training
    model.eval()
    res: Dict[str, Any] = {}
    try:
        if "lm" in parts and eval_ds is not None and len(eval_ds):
            rows = []
            runs = [("fine-tuned", nullcontext)] + ([("base", base_ctx)] if base_ctx is not None else [])
            for name, ctx in runs:
                with ctx():
                    per = lm_eval(forward, eval_ds, sources, pad_id, micro_batch_size, world, rank, dev,
                                  cfg.lm_max_batches, progress)
                rows += [{"model": name, "source": src, **v} for src, v in per.items()]
            res["lm"] = {"rows": rows + _same_tokens_only(rows, base_rows or [])}
        if "intent" in parts and cfg.intent_files:
            examples, labels = load_intents(cfg.intent_files, intent_cfg, cfg.intent_max_examples, cfg.intent_labels)
            labels = list(cfg.intent_labels) or labels
            if fast is None:  # label scoring tokenizes examples x labels conversations
                from data_pipeline.fastchat import FastEncoder

                probe = [list(p) + [{"role": "assistant", "content": lab}] for p, _ in examples[:8] for lab in labels[:4]]
                fast = FastEncoder.build(tokenizer, eot, probe)[0]
            res["intent"] = intent_eval(model, forward, tokenizer, eot, examples, labels, cfg.intent_modes,
                                        cfg.batch_size, world, rank, dev, synced, fast, progress)
        if "response" in parts and conversations and cfg.response_conversations > 0:
            res["response"], res["samples"] = response_eval(model, tokenizer, eot, conversations, cfg, max_len,
                                                            world, rank, dev, synced, progress)
    finally:
        model.train(was_training)
    return res
