"""Read records from files (streaming) and convert each format to chat messages, explicitly.

Readers yield `(where, record)` with `where` = "file:line" (JSONL, CSV), "file:item N" (JSON
array), "file:row N" (Parquet, saved datasets). A record that cannot even be read (bad JSON,
bad bytes) is yielded as a `Problem` so a lenient run can count and skip it.

Formats, detected per record by their keys (or pinned with `data.format=`):

| format | keys | becomes |
|---|---|---|
| `messages` (OpenAI) | `messages: [{role, content}]` | as is |
| `sharegpt` | `conversations: [{from, value}]` | roles mapped by `ROLE_ALIASES` |
| `alpaca` | `instruction`, optional `input`, `output` | user = instruction (+ blank line + input), assistant = output |
| `prompt_completion` | `prompt`, `completion` | user = prompt, assistant = completion |
| `intent` | `text`, `label` | system = intent prompt, user = template(text), assistant = label |
"""
from __future__ import annotations

import bisect
import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"  # the bundled slice (conf/data/sample.yaml)


def is_bundled_sample(path: str) -> bool:
    """Whether a data file is one of the bundled sample's (data_pipeline/sample_data)."""
    try:  # the file itself may be a link (git-annex, DVC): its folder decides
        return SAMPLE_DATA in (Path(path).resolve().parent, Path(os.path.abspath(path)).parent.resolve())
    except OSError:
        return False

def expand_pattern(path: str) -> list:
    """The files a data path names: itself, or for a glob pattern (`*`, `?`, `[...]`; `**` for any
    depth) the files (or saved `datasets` directories) it matches, sorted; an empty list when it
    matches none."""
    if not any(c in path for c in "*?[") or os.path.exists(path):  # (a file named with [ ] is itself)
        return [path]
    import glob

    return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) or _saved_dataset(p))


def _saved_dataset(path: str) -> bool:
    """A directory `datasets` saved (save_to_disk), not any folder a `**` passes through."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "intent")

# ShareGPT-style speaker names -> chat roles (case-insensitive). `sys` is the dialogue system, the
# agent, in MultiWOZ-style usr/sys data; as the FIRST turn, before any user turn, it is read as a
# system prompt instead (ShareGPT files abbreviate "system" so), never trained on as a reply.
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user", "customer": "user", "client": "user", "usr": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "agent": "assistant",
    "model": "assistant", "chatgpt": "assistant", "sys": "assistant",
}


@dataclass
class Problem:
    reason: str
    message: str
    text: str = field(default="", repr=False)  # an undecodable line, its bad bytes replaced (U+FFFD)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def file_kind(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(ext, "jsonl")


def _text_lines(path: str, utf16: str) -> Iterator[Tuple[int, Any]]:
    """(line number, str | Problem) for each line; UTF-8 with optional BOM, UTF-16 by policy."""
    from .chat import DataError

    n = 0
    try:
        with _open_binary(path) as raw:
            head = raw.peek(4)[:4]  # look without consuming
            if head[:2] == b"\x1f\x8b" and not path.endswith(".gz"):
                raise DataError(f"{path}: the file is gzip-compressed (it starts with the bytes 1f 8b), though its name does "
                                f"not end in .gz; name it {os.path.basename(path)}.gz.")
            is_utf16 = head[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(head) >= 2 and (head[0] == 0 or head[1] == 0))
            if is_utf16:
                if utf16 != "convert":
                    raise DataError(f"{path}: the file is UTF-16 encoded; re-encode it as UTF-8 or set data.utf16=convert.")
                data = raw.read()
                enc = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-16-be" if head[0] == 0 else "utf-16-le")
                for n, line in enumerate(io.StringIO(data.decode(enc)), 1):
                    yield n, line
                return
            for n, line in enumerate(raw, 1):
                if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                try:
                    yield n, line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, Problem("invalid_utf8", f"invalid UTF-8 byte 0x{line[e.start]:02x} at byte {e.start} of the line; "
                                     "re-encode the file as UTF-8", line.decode("utf-8", errors="replace"))
    except gzip.BadGzipFile as e:
        if n == 0 and str(e).startswith("Not a gzipped file"):
            raise DataError(f"{path}: not gzip-compressed, though its name ends in .gz; rename it without .gz (or compress "
                            "it with gzip).") from None
        raise _corrupt_gzip(path, n, e) from None
    except (zlib.error, EOFError) as e:
        if not path.endswith(".gz"):
            raise
        raise _corrupt_gzip(path, n, e) from None


def _corrupt_gzip(path: str, n: int, e: Exception):
    from .chat import DataError

    where = f"after line {n}" if n else "at its start"
    if isinstance(e, EOFError):
        return DataError(f"{path}: the gzip data is cut short {where} ({e}); the file is incomplete (an interrupted copy or "
                         "download): fetch or compress it again.")
    return DataError(f"{path}: the gzip data is corrupt (found {where}: {e}); the file was damaged (in a copy or a "
                     "download): fetch or compress it again.")


def gzip_damage(path: str) -> Optional[str]:
    """For a .gz file whose records read as garbage: the sentence saying where its gzip data is corrupt, else None."""
    if not path.endswith(".gz") or not os.path.isfile(path):
        return None
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            for n, _ in enumerate(f, 1):
                pass
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        return None if n == 0 and str(e).startswith("Not a gzipped file") else str(_corrupt_gzip(path, n, e))
    return None


def _json_items(path: str, utf16: str) -> Iterator[Tuple[str, Any]]:
    """The records of a .json file (one array); an item on a line with invalid UTF-8 is that line's Problem."""
    from .chat import DataError

    parts, bad = [], {}
    for n, line in _text_lines(path, utf16):
        if isinstance(line, Problem):
            bad[n], line = line, line.text
        parts.append(line)
    text = "".join(parts)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        if (first := min((n for n in bad if n <= e.lineno), default=None)) is not None:
            raise DataError(f"{path}:{first}: {bad[first].message}.") from None
        lines_hint = ("; it reads as one JSON object per line: that is JSON Lines, name the file .jsonl"
                      if e.msg == "Extra data" and text.lstrip().startswith("{") else "")
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); a .json file must hold one JSON array of "
                        f"records{lines_hint}.") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json file must hold a JSON array of records (use .jsonl for one record per line).")
    spans = _array_spans(text, len(items)) if bad else None
    if spans is not None:
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + len(part))
        bad_lines = sorted(bad)
    for i, item in enumerate(items):
        if spans is not None:  # the item's lines, numbered from 1
            first, last = (bisect.bisect_right(starts, x) for x in (spans[i][0], spans[i][1] - 1))
            k = bisect.bisect_left(bad_lines, first)
            if k < len(bad_lines) and bad_lines[k] <= last:
                yield f"{path}:{bad_lines[k]}", bad[bad_lines[k]]
                continue
        yield f"{path}:item {i}", item


def _array_spans(text: str, count: int) -> list:
    """[(start, end)] character offsets of the items of the JSON array `text` (known to parse)."""
    decoder, spans = json.JSONDecoder(), []
    pos = text.index("[") + 1
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        end = decoder.raw_decode(text, pos)[1]
        spans.append((pos, end))
        pos = end
    return spans


def _csv_rows(path: str, utf16: str) -> Iterator[Tuple[str, Any]]:
    """The rows of a .csv file (a header row, then records); a row with a line of invalid UTF-8 is that line's Problem."""
    from .chat import DataError

    bad, text = {}, []  # text: the lines of the row being read

    def lines():
        for n, line in _text_lines(path, utf16):
            if isinstance(line, Problem):
                if n == 1:
                    raise DataError(f"{path}:1: {line.message} (in the header row).")
                bad[n], line = line, line.text
            text.append(line)
            yield line

    reader = csv.DictReader(lines())
    reader.fieldnames  # reads the header row (or none, in an empty file)
    end = reader.line_num
    text.clear()
    for row in reader:
        start, end = end + 1, reader.line_num
        if end > start and _unclosed_quote(text):  # (the lenient reader takes the rest of the file as one field)
            raise DataError(f"{path}:{start}: a quoted field that starts in this row is never closed (an unmatched \"), so "
                            "every line after it would be read as part of it; close the quote, or write a \" inside a "
                            "quoted field as \"\".")
        text.clear()
        hit = [n for n in bad if start <= n <= end]
        if hit:
            yield f"{path}:{min(hit)}", bad[min(hit)]
        elif None in row:  # (more fields than the header names: csv keeps the rest under None)
            yield f"{path}:{end}", Problem("csv_fields", f"{len(row) - 1 + len(row[None])} fields where the header names "
                                           f"{len(reader.fieldnames)}; a value that holds a comma must be quoted (\"a, b\")")
        else:
            yield f"{path}:{end}", dict(row)
        for n in hit:
            del bad[n]


def _unclosed_quote(lines) -> bool:
    """Whether a CSV row's lines end inside a quoted field (what the strict parser calls the end of data)."""
    try:
        list(csv.reader(lines, strict=True))
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def read_records(path: str, utf16: str = "reject") -> Iterator[Tuple[str, Any]]:
    """Stream (where, dict | Problem) from one file or saved datasets directory."""
    from .chat import DataError

    kind = file_kind(path)
    try:
        if kind == "jsonl":
            for n, line in _text_lines(path, utf16):
                where = f"{path}:{n}"
                if isinstance(line, Problem):
                    yield where, line
                elif line.strip():
                    yield where, _parse_json(line)
        elif kind == "json":
            yield from _json_items(path, utf16)
        elif kind == "csv":
            yield from _csv_rows(path, utf16)
        elif kind == "parquet":
            yield from _parquet_rows(path)
        else:
            if problem := folder_problem(path):
                raise DataError(problem)
            from datasets import load_from_disk

            ds = load_from_disk(path)
            if hasattr(ds, "keys"):  # DatasetDict: take the train split
                ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
            for i, row in enumerate(ds):
                yield f"{path}:row {i + 1}", row
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}); check that it exists and is a readable {kind} file.") from None


def _parquet_rows(path: str) -> Iterator[Tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .chat import DataError

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # (read_records says it cannot be read)
    except (pa.ArrowException, ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        after = f" after row {n}" if n else ""
        raise DataError(f"{path}: not a readable Parquet file{after} ({str(e).strip().splitlines()[0]}); it is damaged or cut "
                        "short, or not Parquet: write or copy it again.") from None


def folder_problem(path: str) -> Optional[str]:
    """The sentence for a data path that is a plain folder (not one `datasets` saved), else None."""
    if not os.path.isdir(path) or _saved_dataset(path):
        return None
    names = sorted(os.listdir(path))
    ext = next((e for e in (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
                if any(n.endswith(e) for n in names)), ".jsonl")
    return (f"{path} is a folder, not a data file or a saved `datasets` directory; to read the files in it, give a glob "
            f"pattern, such as '{os.path.join(path, '*' + ext)}' (or '{os.path.join(path, '**', '*' + ext)}' to take its "
            "subfolders' too).")


def _parse_json(line: str):
    try:
        return json.loads(line.rstrip("\r\n"))  # a line cut mid-string: "unterminated", not "control character"
    except json.JSONDecodeError as e:
        return Problem("invalid_json", f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); each line must be one JSON object")


_FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                "prompt_completion": ("prompt", "completion"), "intent": ("text", "label")}


def detect(rec: Dict) -> Optional[str]:
    """The format of a record by its keys; a null value counts as no key (Arrow gives every row of a
    Parquet file or saved dataset every column), unless that leaves none."""
    return _detect({k for k, v in rec.items() if v is not None}) or _detect(rec)


def _detect(rec) -> Optional[str]:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "text" in rec and "label" in rec:
        return "intent"
    return None


def to_messages(rec: Any, fmt: str, intent_cfg=None):
    """(messages, id) for a record, or a Problem naming what is wrong."""
    if not isinstance(rec, dict):
        return Problem("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    kind = detect(rec) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        return Problem("unknown_format", f"no known conversation format (keys: {keys}); expected messages, conversations, instruction/output, prompt/completion or text/label")
    if fmt != "auto" and detect(rec) not in (None, fmt) and not any(rec.get(k) is not None for k in _FORMAT_KEYS[fmt]):
        other = detect(rec)
        return Problem("unknown_format", f"the format is pinned to {fmt} (data.format, or the source's format), whose records have "
                       f"{'/'.join(_FORMAT_KEYS[fmt])}, but this one has {'/'.join(_FORMAT_KEYS[other])} ({other}): set the "
                       f"format to auto or {other}")
    rid = rec.get("id")
    if kind == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list):
            return Problem("bad_type", "'messages' must be a list of {'role', 'content'} objects")
        return msgs, rid
    if kind == "sharegpt":
        conv = rec.get("conversations")
        if not isinstance(conv, list):
            return Problem("bad_type", "'conversations' must be a list of {'from', 'value'} objects")
        out = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                return Problem("missing_key", f"conversations[{i}] must be an object with 'from' and 'value'")
            who = turn["from"]
            role = ROLE_ALIASES.get(who.lower()) if isinstance(who, str) else None
            if role == "assistant" and who.lower() == "sys" and i == 0:
                role = "system"
            if role is None:
                return Problem("unknown_role", f"conversations[{i}] is from {who!r}, which maps to no role; known: {', '.join(sorted(ROLE_ALIASES))}")
            out.append({"role": role, "content": turn["value"], **({"weight": turn["weight"]} if turn.get("weight") is not None else {})})
        return out, rid
    if kind == "alpaca":
        ins, inp, outp = rec.get("instruction"), rec.get("input"), rec.get("output")
        if not isinstance(ins, str) or not isinstance(outp, str) or (inp is not None and not isinstance(inp, str)):
            return Problem("bad_type", "alpaca records need text 'instruction' and 'output' (and optional text 'input')")
        user = ins if not (inp or "").strip() else f"{ins}\n\n{inp}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": outp}], rid
    if kind == "prompt_completion":
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            return Problem("bad_type", "'prompt' and 'completion' must both be text")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}], rid
    text, label = rec.get("text"), rec.get("label")
    if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
        return Problem("bad_type", "intent records need text 'text' and a text or integer 'label'")
    msgs = []
    if intent_cfg is not None and intent_cfg.system_prompt:
        msgs.append({"role": "system", "content": intent_cfg.system_prompt})
    template = intent_cfg.user_template if intent_cfg is not None else "{text}"
    msgs += [{"role": "user", "content": template.replace("{text}", text)},
             {"role": "assistant", "content": str(label)}]
    return msgs, rid
