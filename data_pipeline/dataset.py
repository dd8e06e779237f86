"""Sources -> validated conversations -> tokenized, weighted, packed Arrow datasets (build) with
their stats (stats_warnings.data_warnings says what the data lost or leaks). Everything is
streamed: records go from the readers through a generator into Arrow files on disk, which are
memory-mapped. data_pipeline/cache.py keys, caches and shares the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from typing import Dict, List

import numpy as np

from .chat import DataError, encode
from .packing import fill_ratio, pack
from .records import Problem, expand_pattern, gzip_damage, read_records, to_messages
from .stats_warnings import data_warnings  # noqa: F401 (its home was here: cache.py and the tests import it so)
from .validate import Report, clean

EVAL_MESSAGES = "eval_messages.jsonl"
DATA_VERSION = 11  # 11: a null weight (Parquet, saved datasets) is no weight, ids unique per source (not across them), every source listed in the stats; 10: assistant messages' weight 0 (OpenAI's format) honoured; 9: lenient skips what the template cannot render; 8: a reply's leading whitespace stripped; 7: truncation counted over the sets as built, a source weighted to nothing listed; 6: an empty held-out set is refused, dropped conversations located; 5: assistant spans of tag-free templates end at the turn's end-of-turn token (trimming templates); 4: eval_fraction split by content


def _held_out_asked(d, srcs) -> str:
    """What asked for a held-out set (its files, or the eval_fraction), for the sentence when it
    came out empty; "" when nothing did."""
    files = [s["path"] for s in srcs if s["split"] == "eval"]
    if files:
        return ", ".join(files)
    return f"data.eval_fraction={d.eval_fraction}" if d.eval_fraction > 0 else ""


def sources_of(d) -> List[Dict]:
    """One source per data file, glob patterns expanded (a pattern's files share its settings)."""
    out = [dict(path=f, weight=1.0, format=d.format, system_prompt=None, split=split)
           for split in ("train", "eval") for p in d[f"{split}_files"] for f in expand_pattern(p)]
    for s in d.sources:
        fmt = s.format if s.format != "auto" else d.format
        out += [dict(path=f, weight=float(s.weight), format=fmt, system_prompt=s.system_prompt, split=s.split)
                for f in expand_pattern(s.path)]
    return out


def content_hash(messages: List[Dict[str, str]]) -> int:
    """64-bit (signed, for Arrow's int64) hash of a conversation's user and assistant turns, each
    NFC-normalized with runs of whitespace as one space: the same conversation in two files (or
    with other line breaks) hashes the same. The system prompt is left out, as a source's
    `system_prompt` adds one that is not part of what was said."""
    turns = [(m["role"], " ".join(unicodedata.normalize("NFC", m["content"]).split()))
             for m in messages if m["role"] != "system"]
    digest = hashlib.blake2b(json.dumps(turns, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _in_eval(content: int, seed: int, fraction: float) -> bool:
    """The eval_fraction carve, by content: the same under any spelling of the file's path (or
    DIALTUNE_DATA_DIR, or cwd), and duplicates of one conversation fall on the same side."""
    x = int.from_bytes(hashlib.blake2b(f"{seed}:{content}".encode(), digest_size=8).digest(), "big")
    return x / 2**64 < fraction


def validated_conversations(d, report: Report):
    """Generator of validated conversations from every source (one streaming pass)."""
    from types import SimpleNamespace

    carve = d.eval_fraction > 0 and not any(s["split"] == "eval" for s in sources_of(d))
    # plain attributes: an OmegaConf lookup per message costs more than the checks themselves
    policy = SimpleNamespace(**{k: d[k] for k in ("max_message_chars", "long_message", "same_role", "trailing_user")})
    intent = SimpleNamespace(**d.intent)
    for k, s in enumerate(sources_of(d)):
        read_before, seen_ids = report.read, {}  # id -> where its first copy is (ids are unique within a source)
        try:
            for where, rec in read_records(s["path"], d.utf16):
                report.read += 1
                if isinstance(rec, Problem):
                    report.problem(where, rec)
                    continue
                conv = to_messages(rec, s["format"], intent)
                if isinstance(conv, Problem):
                    report.problem(where, conv)
                    continue
                messages, rid = conv
                if d.duplicate_ids == "reject" and not _no_id(rid):
                    key = str(rid)
                    if key in seen_ids:
                        report.problem(where, Problem("duplicate_id", f"id {rid!r} already appeared at {seen_ids[key]}; "
                                                                      "remove one copy (or set data.duplicate_ids=keep)"))
                        continue
                    seen_ids[key] = where
                if s["system_prompt"] and isinstance(messages, list) and not (
                        messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
                    messages = [{"role": "system", "content": s["system_prompt"]}] + messages
                cleaned = clean(messages, policy, report.fixes)
                if isinstance(cleaned, Problem):
                    report.problem(where, cleaned)
                    continue
                report.kept += 1
                split, content = s["split"], content_hash(cleaned)
                if carve and split == "train" and _in_eval(content, d.seed, d.eval_fraction):
                    split = "eval"
                # assistant turns of weight 0 (context only) by index: every row's messages keep one Arrow type
                untrained = [i for i, m in enumerate(cleaned) if "weight" in m]
                if untrained:
                    cleaned = [{"role": m["role"], "content": m["content"]} for m in cleaned]
                yield {"messages": cleaned, "source": k, "where": where, "split": split, "hash": content, "untrained": untrained}
        except DataError:  # (strict: enough errors) garbage lines of a damaged .gz: say that instead
            if damage := gzip_damage(s["path"]):
                raise DataError(damage) from None
            raise
        report.source_reads[k] = report.read - read_before
    report.finished = True
    report.raise_errors()


def _no_id(rid) -> bool:
    """An id that is none: missing, null (Arrow's for a row without one), NaN (pandas') or blank (an empty CSV cell)."""
    return rid is None or (isinstance(rid, float) and rid != rid) or (isinstance(rid, str) and not rid.strip())


def _features():
    """The Arrow types of validated_conversations' rows, given: inferred from the first rows, an
    `untrained` column empty in all of them would be typed null and a later index refused."""
    from datasets import Features, Sequence, Value

    return Features({"messages": [{"role": Value("string"), "content": Value("string")}], "source": Value("int64"),
                     "where": Value("string"), "split": Value("string"), "hash": Value("int64"),
                     "untrained": Sequence(Value("int64"))})


def fast_encoder(tokenizer, eot_id: int, sample):
    """The verified fast encoder (fastchat.FastEncoder) or None, and a line saying which path runs."""
    from .fastchat import FastEncoder

    try:
        enc, why = FastEncoder.build(tokenizer, eot_id, sample)
    except Exception as e:  # a conversation the template refuses: the exact path names its record
        enc, why = None, f"checking it on the data failed ({type(e).__name__})"
    if enc is None:
        return None, f"exact path (chat template per conversation): the fast path does not apply: {why}"
    return enc, f"fast path ({enc.backend}), identical to the chat template's on the first {len(sample)} conversations"


def with_weights(messages: List[Dict[str, str]], untrained: List[int]) -> List[Dict]:
    """The messages with weight 0 on the assistant turns not trained on (data_pipeline/chat.encode reads it)."""
    return [{**m, "weight": 0} if i in untrained else m for i, m in enumerate(messages)] if untrained else messages


def through_last_target(messages: List[Dict], untrained: List[int]) -> List[Dict]:
    """The conversation up to its last assistant turn that is trained on (a generation eval's reference)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and i not in untrained)
    return messages[:last + 1]


def _tokenize_fn(tokenizer, eot_id: int, d, fast):
    max_len, truncation, last_turn = d.max_seq_len, d.truncation, d.labels == "last_turn"  # no OmegaConf per row
    lenient = d.on_error == "lenient"

    def fn(batch):
        out = {"input_ids": [], "labels": [], "length": [], "n_targets": [], "outcome": []}
        for messages, where, untrained in zip(batch["messages"], batch["where"], batch["untrained"]):
            messages = with_weights(messages, untrained)
            try:
                ids, labels, outcome = encode(tokenizer, messages, eot_id, max_len, truncation, last_turn, fast)
            except Exception as e:  # e.g. a template that raises on this conversation's roles
                if lenient:  # skipped like any invalid record, counted and located (data_warnings)
                    ids, labels, outcome = None, None, "unrenderable"
                elif isinstance(e, DataError):
                    raise DataError(f"{where}: {e}") from None
                else:
                    reason = (str(e).strip().splitlines() or [""])[0]
                    raise DataError(f"{where}: the chat template cannot tokenize this conversation ({type(e).__name__}"
                                    f"{': ' + reason if reason else ''}); fix or remove this record, set data.on_error=lenient "
                                    "to skip such records, or set data.chat_template to a template that accepts it.") from None
            ids, labels = ids or [], labels or []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["n_targets"].append(sum(1 for t in labels[1:] if t != -100))
            out["outcome"].append(outcome)
        return out

    return fn


def _column(ds, name: str) -> np.ndarray:
    """One column as a numpy array, read from Arrow in one go (indexing by name iterates rows)."""
    return ds.with_format("arrow")[:][name].to_numpy(zero_copy_only=False)


def _weighted_indices(sources: np.ndarray, weights: Dict[int, float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for k in np.unique(sources):
        idx = np.flatnonzero(sources == k)
        w = weights[int(k)]
        reps = int(w)
        part = [idx] * reps
        frac = w - reps
        if frac > 0:
            part.append(np.sort(rng.choice(idx, size=int(round(frac * len(idx))), replace=False)))
        out.extend(part)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _percentiles(lengths) -> Dict[str, float]:
    a = np.asarray(lengths) if len(lengths) else np.zeros(1)
    return {f"p{p}": float(np.percentile(a, p)) for p in (50, 90, 99)} | {"max": int(a.max()), "mean": float(a.mean())}


def build(d, tokenizer, eot_id: int, out_dir: str, log=print) -> Dict:
    """Validate, tokenize, weight, pack and save into out_dir; returns the stats."""
    from datasets import Dataset

    report = Report(d.on_error, d.max_errors_shown)
    srcs = sources_of(d)
    # named after the key, so the next builder of that key can tell a dead build's folder (cache._clean_dead)
    work = tempfile.mkdtemp(prefix=f"dialtune-data-{os.path.basename(out_dir)}-", dir=os.path.dirname(out_dir))
    try:
        try:
            raw = Dataset.from_generator(validated_conversations, gen_kwargs={"d": d, "report": report}, features=_features(),
                                         cache_dir=os.path.join(work, "gen"), keep_in_memory=False)
        except DataError:
            raise
        except Exception as e:  # datasets wraps generator errors (and fails on zero rows)
            cause = e.__cause__ or e.__context__
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            if report.kept or not report.finished:  # (a failure to read, not a build without rows)
                raise
            raw = None
        if report.kept == 0:
            raise DataError(f"no usable conversation in {', '.join(s['path'] for s in srcs)} "
                            f"({report.read} records read; skipped: {dict(report.counts) or 'none'}); nothing to train on.")
        if report.counts:
            log(f"data: skipped {sum(report.counts.values())} of {report.read} records (data.on_error={d.on_error}):\n{report.table()}")
        fast = None
        if d.fast_tokenization:
            fast, how = fast_encoder(tokenizer, eot_id, raw.select(range(min(64, len(raw))))["messages"])
            log("data: tokenizing with the " + how)
        tok = raw.map(_tokenize_fn(tokenizer, eot_id, d, fast), batched=True, batch_size=256,
                      num_proc=d.num_proc if d.num_proc > 1 else None, remove_columns=["messages"],
                      desc="tokenizing", cache_file_name=os.path.join(work, "tok.arrow"))
        outcome, valid_source = _column(tok, "outcome"), _column(tok, "source")
        is_train = _column(tok, "split") == "train"
        kept = np.flatnonzero((outcome != "dropped") & (outcome != "unrenderable"))
        dropped_where = [str(w) for w in tok.select(np.flatnonzero(outcome == "dropped")[:3])["where"]]  # for the warning
        unrenderable = np.flatnonzero(outcome == "unrenderable")
        unrenderable_where = [str(w) for w in tok.select(unrenderable[:3])["where"]]
        tok = tok.select(kept)
        split = _column(tok, "split")
        stats = {"version": DATA_VERSION, "validation": report.as_dict(), "max_seq_len": d.max_seq_len,
                 "truncation": {"policy": d.truncation, "dropped": int((outcome == "dropped").sum()),
                                "dropped_where": dropped_where},
                 "unrenderable": {"count": len(unrenderable), "where": unrenderable_where}}
        built = Counter()  # the truncated rows of the sets as built (training after the sources' weights)
        shutil.rmtree(out_dir + ".part", ignore_errors=True)  # a killed build's files must not ride along
        os.makedirs(out_dir + ".part")
        training = any(s["split"] == "train" for s in srcs)
        for name in ("train", "eval"):
            part = tok.select(np.flatnonzero(split == name))
            if name == "train" and training:  # (an eval's build reads the held-out files alone)
                if len(part) == 0:
                    files = ", ".join(s["path"] for s in srcs if s["split"] == "train")
                    too_long = int((is_train & (outcome == "dropped")).sum())
                    refused = int((is_train & (outcome == "unrenderable")).sum())
                    if refused:
                        raise DataError(f"no training conversation in {files}: the chat template refused {refused} of them "
                                        f"(first at {', '.join(unrenderable_where)}), the rest were skipped or too long; run with "
                                        "data.on_error=strict to see the template's error, or set data.chat_template.")
                    raise DataError(
                        f"no training conversation in {files}: " + (
                            f"all {too_long} that passed validation are longer than data.max_seq_len={d.max_seq_len} and were dropped "
                            f"(data.truncation={d.truncation}); raise data.max_seq_len"
                            + (" (not even one assistant turn with its context fits)." if d.truncation == "keep_recent"
                               else " or use data.truncation=keep_recent.")
                            if too_long else "no usable record (an empty file, or every record skipped as reported above, "
                            "or all of them held out for eval)."))
                weights = {k: s["weight"] for k, s in enumerate(srcs)}
                unweighted = Counter(_column(part, "source").tolist())
                if any(w != 1.0 for w in weights.values()):
                    part = part.select(_weighted_indices(_column(part, "source"), weights, d.seed))
            if len(part) == 0 and name == "eval" and (asked := _held_out_asked(d, srcs)):
                too_long = int((~is_train & (outcome == "dropped")).sum())
                raise DataError(
                    f"{asked} gave no held-out conversation: " + (
                        f"all {too_long} are longer than data.max_seq_len={d.max_seq_len} and were dropped; raise "
                        "data.max_seq_len or use data.truncation=keep_recent" if too_long else
                        f"it drew none of the {int(is_train.sum())} training conversations (a share drawn by content); raise it "
                        "or give data.eval_files" if asked.startswith("data.eval_fraction") else
                        "no usable record (an empty file, or every record skipped as reported above)") +
                    ("; or train without a held-out loss: data.eval_files=[] and data.eval_fraction=0." if training else "."))
            if len(part) == 0:
                continue
            if name == "eval":  # the text of the eval conversations, row for row, for generation evals
                with open(os.path.join(out_dir + ".part", EVAL_MESSAGES), "w", encoding="utf-8") as f:
                    for row in raw.select(kept[split == "eval"]).select_columns(["messages", "source", "untrained"]):
                        row["messages"] = through_last_target(row["messages"], row.pop("untrained"))
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            built.update(_column(part, "outcome").tolist())
            built["rows"] += len(part)
            part = part.flatten_indices(cache_file_name=os.path.join(work, f"{name}.flat.arrow"))
            part.save_to_disk(os.path.join(out_dir + ".part", name))
            lengths = _column(part, "length")
            targets = _column(part, "n_targets")
            src = _column(part, "source")
            stats[name] = {
                "conversations": len(part), "tokens": int(lengths.sum()), "target_tokens": int(targets.sum()),
                "target_share": float(targets.sum() / max(1, lengths.sum())), "length": _percentiles(lengths),
                "sources": {srcs[k]["path"]: {"conversations": int((src == k).sum()),
                                              "tokens": int(lengths[src == k].sum()),
                                              "weight": srcs[k]["weight"]} for k in np.unique(src)},
            }
            if name == "train":  # a source its weight drew nothing of is listed (and warned about), not lost silently
                for k, n in sorted(unweighted.items()):
                    entry = stats[name]["sources"].setdefault(srcs[k]["path"], {"conversations": 0, "tokens": 0,
                                                                               "weight": srcs[k]["weight"]})
                    entry["unweighted"] = n
            for k, s in enumerate(srcs):  # so is a source that gave this set nothing at all (data_warnings says why)
                if s["split"] == name and s["path"] not in stats[name]["sources"]:
                    mine = valid_source == k
                    stats[name]["sources"][s["path"]] = {
                        "conversations": 0, "tokens": 0, "weight": s["weight"],
                        "empty": {"records": report.source_reads[k], "valid": int(mine.sum()),
                                  "held_out": int((mine & ~is_train).sum()) if name == "train" else 0,
                                  "dropped": int((mine & (outcome == "dropped")).sum()),
                                  "unrenderable": int((mine & (outcome == "unrenderable")).sum())}}
            if name == "train" and d.packing:
                bins = pack(lengths.tolist(), d.max_seq_len, d.seed)
                Dataset.from_dict({"members": bins}).save_to_disk(os.path.join(out_dir + ".part", "train_packs"))
                stats["packing"] = {"rows": len(bins), "fill_ratio": fill_ratio(bins, lengths, d.max_seq_len),
                                    "docs_per_row": len(part) / max(1, len(bins))}
        truncated = built["truncated"] + built["cut"]
        stats["truncation"].update(truncated=truncated, cut=built["cut"], built=built["rows"],
                                   truncated_share=truncated / max(1, built["rows"]))
        if (split == "eval").any():
            stats["overlap"] = _overlap(_column(tok, "hash"), _column(tok, "source"), split, srcs)
        with open(os.path.join(out_dir + ".part", "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(out_dir + ".part", out_dir)
        return stats
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir + ".part", ignore_errors=True)


def _overlap(hashes: np.ndarray, sources: np.ndarray, split: np.ndarray, srcs: List[Dict]) -> Dict:
    """How many eval conversations also occur in training (same user/assistant turns), and where."""
    tr, ev = split == "train", split == "eval"
    dup = np.isin(hashes[ev], hashes[tr])
    in_train = np.isin(hashes[tr], hashes[ev][dup])
    return {"eval_in_train": int(dup.sum()), "eval_conversations": int(ev.sum()),
            "eval_files": [srcs[k]["path"] for k in np.unique(sources[ev][dup])],
            "train_files": [srcs[k]["path"] for k in np.unique(sources[tr][in_train])]}
