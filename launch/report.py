"""`dialtune report <run_dir>`: PNG plots and a one-page Markdown + HTML summary of a run, for people
without W&B. Reads metrics.jsonl (required), summary.json, data_stats.json, export_summary.json and
eval/results.json + eval/samples.jsonl (optional); writes <run_dir>/report/."""
from __future__ import annotations

import argparse
import html
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

from train.eval_metrics import md_fence

# plot file -> (title, y label, [(metrics key, legend label)])
PLOTS = {
    "lr": ("Learning rate", "lr", [("train/lr", "train/lr")]),
    "throughput": ("Throughput (all ranks)", "tokens / s", [("perf/target_tok_s", "target tok/s"), ("perf/tok_s", "input tok/s")]),
    "mfu": ("Model FLOPs utilisation", "MFU", [("perf/mfu", "MFU")]),
    "memory": ("Memory (rank 0)", "GB", [("mem/gpu_peak_gb", "GPU peak"), ("mem/gpu_alloc_gb", "GPU allocated"), ("mem/rss_gb", "CPU RSS")]),
}


class ReportError(Exception):
    """A run directory the report cannot be made from (one sentence)."""


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _load_json(path: Path, notes: list):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} could not be read ({e}); its section is left out.")
        return None


def read_metrics(path: Path, notes: list) -> list:
    """Rows sorted by step, one per step: the rows of a step are merged, later values winning (the
    end-of-training eval's second row joins the step's own; a step logged again after a resume
    keeps its new values)."""
    rows, bad = {}, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:  # e.g. the half-written last line of a killed job
            row = None
            bad += 1
        if isinstance(row, dict) and _num(row.get("step")) is not None:
            rows[int(row["step"])] = {**rows.get(int(row["step"]), {}), **row}
    if bad:
        notes.append(f"{bad} unreadable line(s) of metrics.jsonl were skipped.")
    return [rows[s] for s in sorted(rows)]


def series(rows: list, key: str):
    pts = [(r["step"], _num(r.get(key))) for r in rows]
    pts = [(s, v) for s, v in pts if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def _plot(path: Path, title: str, ylabel: str, lines: list, markers: list = ()) -> bool:
    """lines/markers: [(label, steps, values)]; False (nothing written) when there is no point."""
    if not any(xs for _, xs, _ in [*lines, *markers]):
        return False
    # the Agg canvas directly: no pyplot, no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(7, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, xs, ys in lines:
        if xs:
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    for i, (label, xs, ys) in enumerate(markers):
        if xs:
            ax.plot(xs, ys, linestyle="--" if i else "-", marker="o" if not i else "x", markersize=6 if not i else 4, label=label)
    if ylabel == "MFU" and max((v for _, _, ys in lines for v in ys), default=0) <= 1:  # a fraction: show it as %
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")
    return True


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def _scalars(d: dict, prefix: str = "") -> list:
    """(key, value) rows of a dict's scalars, one level of nesting flattened as a.b."""
    out = []
    for k, v in (d or {}).items():
        if isinstance(v, dict) and not prefix:
            out += _scalars(v, f"{k}.")
        elif not isinstance(v, (dict, list)):
            out.append((prefix + str(k), v))
    return out


def _data_section(stats: dict) -> list:
    blocks, v, t = [], stats.get("validation") or {}, stats.get("truncation") or {}
    if v:
        blocks.append(("p", (f"Records read {_fmt(v.get('records_read'))}, kept {_fmt(v.get('records_kept'))}, "
                            f"skipped {_fmt(sum((v.get('skipped') or {}).values()))}.")))
    if t:
        blocks.append(("p", f"Truncation ({t.get('policy')}): {_fmt(t.get('truncated'))} truncated, {_fmt(t.get('dropped'))} dropped."))
    rows = []
    for split in ("train", "eval"):
        s = stats.get(split)
        if isinstance(s, dict):
            ln = s.get("length") or {}
            rows.append([split, _fmt(s.get("conversations")), _fmt(s.get("tokens")), _fmt(s.get("target_tokens")),
                         f"{s['target_share']:.1%}" if _num(s.get("target_share")) is not None else "",
                         *(_fmt(ln.get(p)) for p in ("p50", "p90", "p99", "max")), _fmt(len(s.get("sources") or {}))])
    if rows:
        blocks.append(("table", ["split", "conversations", "tokens", "target tokens", "target share",
                                 "len p50", "len p90", "len p99", "len max", "sources"], rows))
    if isinstance(stats.get("packing"), dict):
        p = stats["packing"]
        blocks.append(("p", (f"Packing: {_fmt(p.get('rows'))} rows, fill ratio {_fmt(p.get('fill_ratio'))}, "
                            f"{_fmt(p.get('docs_per_row'))} conversations/row.")))
    return blocks


def _eval_section(res: dict) -> list:
    blocks = [("p", f"Checkpoint {res.get('checkpoint', '?')}" + (f" (step {res['step']})." if res.get("step") is not None else "."))]
    from train.eval_results import lm_rows

    lm = lm_rows(res)
    if lm:
        by = {}
        for r in lm:
            by.setdefault(r["source"], {})[r["model"]] = r
        rows = []
        for src in sorted(by, key=lambda s: (s != "all", s)):
            b, f = by[src].get("base", {}), by[src].get("fine-tuned", {})
            d = _num(f.get("loss")) - _num(b.get("loss")) if _num(f.get("loss")) is not None and _num(b.get("loss")) is not None else None
            rows.append([src, _fmt((f or b).get("target_tokens")), _fmt(b.get("loss")), _fmt(b.get("ppl")),
                         _fmt(f.get("loss")), _fmt(f.get("ppl")), _fmt(d)])
        blocks += [("h3", "Language modelling (held-out loss per source)"),
                   ("table", ["source", "target tokens", "base loss", "base ppl", "fine-tuned loss", "fine-tuned ppl", "Δ loss"], rows)]
    intent = res.get("intent") or {}
    if intent:
        blocks += [("h3", "Intent classification"),
                   ("table", ["mode", "accuracy", "macro-F1", "n", "unknown"],
                    [[m, _fmt(r.get("accuracy")), _fmt(r.get("macro_f1")), _fmt(r.get("n")), _fmt(r.get("unknown"))] for m, r in intent.items()])]
        for mode, r in intent.items():
            pc = r.get("per_class") or {}
            if pc:
                blocks += [("p", f"Per class ({mode}):"),
                           ("table", ["label", "precision", "recall", "F1", "support"],
                            [[lab, *(_fmt(c.get(k)) for k in ("precision", "recall", "f1", "support"))] for lab, c in sorted(pc.items())])]
    resp = res.get("response") or {}
    if resp:
        order = ["chrf", "bleu", "rougeL", "stopped_share", "repetition_share", "mean_words", "n"]
        keys = [k for k in order if any(k in r for r in resp.values())] + sorted({k for r in resp.values() for k in r} - set(order))
        blocks += [("h3", "Responses"), ("table", ["decoding", *keys], [[dec, *(_fmt(r.get(k)) for k in keys)] for dec, r in resp.items()])]
    return blocks


def run_title(run_dir: Path) -> str:
    """The run's name; a sweep's job: <name>-sweep/<job> (as W&B names it)."""
    from train.config import run_label

    return run_label(run_dir)[0]


def _overrides(run_dir: Path) -> Optional[str]:
    """The command line's overrides of the run (a sweep job's own values), from Hydra's record."""
    try:
        import yaml

        found = yaml.safe_load((run_dir / "hydra" / "overrides.yaml").read_text())
    except (OSError, ValueError, ImportError, AttributeError):
        return None
    return " ".join(map(str, found)) if isinstance(found, list) and found else None


def _nothing_held_out(run_dir: Path) -> bool:
    """Whether the run's config has nothing `dialtune eval` could measure without more files."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
        return not (cfg.data.eval_files or cfg.data.eval_fraction or any(s.split == "eval" for s in cfg.data.sources)
                    or cfg.eval.intent_files)
    except Exception:  # noqa: BLE001 - no or an older config: say the usual
        return False


def build_blocks(run_dir: Path, rows: list, plots: dict, notes: list, max_samples: int) -> list:
    blocks = [("h1", f"dialtune report: {run_title(run_dir)}"), ("p", f"Run directory {run_dir.resolve()}.")]
    summary = _load_json(run_dir / "summary.json", notes)
    last = {"logged steps": len(rows), "last logged step": rows[-1]["step"]}
    if overrides := _overrides(run_dir):
        last = {"overrides": overrides, **last}
    for key in ("train/loss", "eval/loss", "eval/ppl"):
        s, v = series(rows, key)
        if v:
            last[f"last {key} (step {s[-1]})"] = v[-1]
    _, tok_s = series(rows, "perf/tok_s")
    if tok_s:
        last["median tok/s"] = statistics.median(tok_s)
    table = _scalars(summary if isinstance(summary, dict) else {}) + list(last.items())
    blocks += [("h2", "Run summary"), ("table", ["key", "value"], [[k, _fmt(v)] for k, v in table])]
    if summary is None:
        notes.append("No summary.json: the run may still be training or was stopped early.")
    if plots:
        blocks += [("h2", "Plots"), *[("img", p.name, name) for name, p in plots.items()]]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        keys = sorted({k for r in evals for k in r if k.startswith("eval/") and _num(r[k]) is not None},
                      key=lambda k: (k not in ("eval/loss", "eval/ppl"), k))
        blocks += [("h2", "Held-out eval during training"),
                   ("table", ["step", *keys], [[_fmt(r["step"]), *(_fmt(r.get(k)) for k in keys)] for r in evals])]
    stats = _load_json(run_dir / "data_stats.json", notes)
    if isinstance(stats, dict):
        blocks += [("h2", "Data"), *_data_section(stats)]
    elif not (run_dir / "data_stats.json").exists():
        notes.append("No data_stats.json: the run stopped before its data was prepared; the Data section is left out.")
    export = _load_json(run_dir / "export_summary.json", notes) or _load_json(run_dir / "merged" / "export_summary.json", notes)
    if isinstance(export, dict):
        blocks += [("h2", "Merged export"), ("table", ["key", "value"], [[k, _fmt(v)] for k, v in _scalars(export)])]
    elif export is None:
        notes.append(f"No merged/export_summary.json: the run has no merged checkpoint yet (`dialtune merge {run_dir}`).")
    res = _load_json(run_dir / "eval" / "results.json", notes)
    if res is None and not (run_dir / "eval" / "results.json").exists():
        notes.append(f"No eval/results.json: the run has no held-out set or intent files to evaluate (`dialtune eval {run_dir} "
                     "data.eval_files=[...]` or `eval.intent_files=[...]` measures it on files you give)." if _nothing_held_out(run_dir)
                     else f"No eval/results.json: no end-of-training evaluation yet (`dialtune eval {run_dir}`).")
    if isinstance(res, dict):
        try:
            blocks += [("h2", "Latest evaluation"), *_eval_section(res)]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            notes.append(f"eval/results.json has an unexpected shape ({type(e).__name__}: {e}); its tables are left out.")
    samples_path = run_dir / "eval" / "samples.jsonl"
    if samples_path.is_file() and max_samples > 0:
        samples = []
        for line in samples_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                samples.append(row)
            if len(samples) >= max_samples:
                break
        if samples:
            blocks.append(("h2", f"Samples (first {len(samples)})"))
            for i, s in enumerate(samples, 1):
                blocks.append(("h3", f"Sample {i} ({s.get('decoding', '?')})"))
                blocks += [("pre", part, str(s.get(part, ""))) for part in ("context", "reference", "generation")]
    if notes:
        blocks += [("h2", "Notes"), *[("p", n) for n in notes]]
    return blocks


def _md_cell(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append("#" * int(b[0][1]) + " " + _md_cell(b[1]))
        elif b[0] == "p":
            out.append(_md_cell(b[1]))
        elif b[0] == "table":
            out += ["| " + " | ".join(map(_md_cell, b[1])) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
        elif b[0] == "img":
            out.append(f"[![{b[2]}]({b[1]})]({b[1]})")
        elif b[0] == "pre":  # shown verbatim, never as HTML
            out += [f"**{b[1]}**", md_fence(b[2])]
        out.append("")
    return "\n".join(out)


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           ("<style>body{font-family:sans-serif;max-width:62em;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}img{max-width:100%}</style></head><body>")]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2]]
            out.append("</table>")
        elif b[0] == "img":
            out.append(f'<p><a href="{e(b[1])}"><img src="{e(b[1])}" alt="{e(b[2])}"></a></p>')
        elif b[0] == "pre":
            out.append(f"<p><b>{e(b[1])}</b></p><pre>{e(b[2])}</pre>")
    return "\n".join(out + ["</body></html>", ""])


def write_report(run_dir, out_dir=None, max_samples: int = 10) -> dict:
    """Write the plots, report.md and report.html; return {name: path} of what was written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} does not exist or is not a directory: pass the run directory training wrote.")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        for up in (run_dir.parent, run_dir.parent.parent):  # <run>/merged, <run>/eval, <run>/checkpoints/step_N
            if (up / "metrics.jsonl").is_file():
                raise ReportError(f"{run_dir} lies inside the run directory {up}: pass that (`dialtune report {up}`).")
        jobs = sorted((d.name for d in run_dir.iterdir() if (d / "metrics.jsonl").is_file() and not d.name.startswith("earlier-")),
                      key=lambda n: (len(n), n))
        if jobs:  # <name>-sweep/: a run directory per job
            raise ReportError(f"{run_dir} holds the runs of a sweep, each a run directory of its own: report one of them, "
                              f"e.g. `dialtune report {run_dir / jobs[0]}` (jobs: {', '.join(jobs)}).")
        raise ReportError(f"{run_dir} has no metrics.jsonl: is it a dialtune run directory?")
    notes = []
    rows = read_metrics(metrics, notes)
    if not rows:
        raise ReportError(f"{metrics} has no metric rows yet: has the run logged its first step?")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    eval_lines = [("eval/loss", *series(rows, "eval/loss"))]
    eval_lines += [(k, *series(rows, k)) for k in sorted({k for r in rows for k in r if k.startswith("eval/loss/")})]
    if _plot(out / "loss.png", "Loss", "cross-entropy (nats/token)", [("train/loss", *series(rows, "train/loss"))], eval_lines):
        written["loss"] = out / "loss.png"
    for name, (title, ylabel, keys) in PLOTS.items():
        if _plot(out / f"{name}.png", title, ylabel, [(label, *series(rows, k)) for k, label in keys]):
            written[name] = out / f"{name}.png"
    blocks = build_blocks(run_dir, rows, dict(written), notes, max_samples)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, f"dialtune report: {run_title(run_dir)}"), encoding="utf-8")
    written.update(markdown=out / "report.md", html=out / "report.html")
    return {k: str(v) for k, v in written.items()}


def cmd_report(args) -> int:
    try:
        written = write_report(args.run_dir, args.out, args.samples)
    except ReportError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"dialtune: error: the report needs matplotlib ({e}); pip install matplotlib.", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dialtune: error: cannot write the report ({e}).", file=sys.stderr)
        return 2
    print(f"dialtune: report written: {written['markdown']} and {written['html']} "
          f"({len(written) - 2} plots: {', '.join(k for k in written if k not in ('markdown', 'html')) or 'none'})")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `dialtune report` on the subparsers of launch/cli.py."""
    r = sub.add_parser("report", help="plots and a Markdown + HTML summary of a run directory (no W&B needed)")
    r.add_argument("run_dir", help="the run directory training wrote (with metrics.jsonl)")
    r.add_argument("--out", default=None, help="output directory (default: <run_dir>/report)")
    r.add_argument("--samples", type=int, default=10, help="eval samples shown (default 10; 0: none)")
    r.set_defaults(fn=cmd_report)
    return r


def main(argv=None) -> int:
    """`python -m launch.report ...` = `dialtune report ...`."""
    from launch.cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
