"""`dialtune report`: plots and a Markdown + HTML summary from a hand-written run directory (no training)."""
import json

import pytest

from launch.report import main, read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> my card never arrived"


def _metrics_rows(with_eval=True, with_mfu=True):
    rows = []
    for step in range(1, 11):
        row = {"step": step, "time": 1000.0 + step, "train/loss": 3.0 - 0.2 * step, "train/lr": 2e-4 * min(1, step / 3),
               "train/grad_norm": 1.0, "train/skipped_steps": 0, "perf/target_tok_s": 500.0 + 10 * step,
               "perf/tok_s": 1000.0 + 20 * step, "perf/step_time_s": 0.5, "mem/rss_gb": 1.0 + 0.01 * step}
        if with_mfu:
            row["perf/mfu"] = None if step == 1 else 0.30 + 0.01 * step  # null on the first step
        if with_eval and step in (5, 10):
            row.update({"eval/loss": 2.5 - 0.05 * step, "eval/ppl": 10.0, "eval/loss/bitext": 2.4, "eval/loss/banking77": 2.6})
        rows.append(row)
    # the job died after step 6 and was resumed from the checkpoint at step 5: steps 6 and 7 are logged again
    return rows[:7] + [dict(rows[5], **{"train/loss": 1.75}), dict(rows[6], **{"train/loss": 1.5})] + rows[7:]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


RESULTS = {
    "step": 10, "checkpoint": "checkpoints/step_0000010",
    "lm": {"rows": [{"model": m, "source": s, "loss": loss, "ppl": 2.718 ** loss, "target_tokens": 1234}
                    for m, base in (("base", 4.0), ("fine-tuned", 2.0)) for s, loss in (("all", base), ("bitext", base + 0.1))]},
    "intent": {"loglik": {"accuracy": 0.75, "macro_f1": 0.7, "n": 40, "unknown": 0,
                          "per_class": {"card_arrival": {"precision": 0.8, "recall": 0.9, "f1": 0.85, "support": 20},
                                        "lost_card": {"precision": 0.625, "recall": 0.5, "f1": 0.5556, "support": 20}}},
               "generate": {"accuracy": 0.6, "macro_f1": 0.55, "n": 40, "unknown": 3, "per_class": {}}},
    "response": {"greedy": {"chrf": 41.2, "bleu": 12.3, "rougeL": 0.33, "stopped_share": 0.95, "repetition_share": 0.05,
                            "mean_words": 23.5, "n": 16},
                 "sampled": {"chrf": 38.0, "bleu": 10.1, "rougeL": 0.3, "stopped_share": 0.9, "repetition_share": 0.1,
                             "mean_words": 25.0, "n": 16}},
}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "tiny-lora-none"
    (run / "eval").mkdir(parents=True)
    _write_jsonl(run / "metrics.jsonl", _metrics_rows())
    (run / "summary.json").write_text(json.dumps({"steps": 10, "total_steps": 10, "finished": True, "world_size": 2,
                                                  "params_trainable": 12345, "eval/loss": 2.0, "eval/ppl": 7.39}))
    (run / "data_stats.json").write_text(json.dumps({
        "validation": {"records_read": 367, "records_kept": 367, "skipped": {}},
        "truncation": {"policy": "keep_recent", "truncated": 20, "dropped": 0, "truncated_share": 0.054},
        "train": {"conversations": 307, "tokens": 80885, "target_tokens": 46100, "target_share": 0.57,
                  "length": {"p50": 225, "p90": 469, "p99": 508, "max": 512}, "sources": {"train.jsonl": {}}}}))
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    (run / "merged").mkdir()
    (run / "merged" / "export_summary.json").write_text(json.dumps({"dtype": "fp32", "verify_max_abs_logit_diff": 2e-6}))
    _write_jsonl(run / "eval" / "samples.jsonl", [
        {"context": "user: where is my card?", "reference": "It ships in 3 days.", "generation": EVIL, "decoding": "greedy"},
        {"context": "user: hi ```code```", "reference": "Hello!", "generation": "Hi, how can I help?", "decoding": "sampled"},
        {"context": "user: third", "reference": "r3", "generation": "THIRD SAMPLE", "decoding": "greedy"}])
    return run


def _assert_png_not_blank(path):
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert imread(str(path)).var() > 0, f"{path} is blank"


def test_report_of_a_full_run_dir(run_dir):
    written = write_report(run_dir)
    out = run_dir / "report"
    for name in ("loss", "lr", "throughput", "mfu", "memory"):
        assert written[name] == str(out / f"{name}.png")
        _assert_png_not_blank(out / f"{name}.png")
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    # the resumed steps keep their last row
    rows = read_metrics(run_dir / "metrics.jsonl", [])
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[5]["train/loss"] == 1.75
    # summary, data, training-time eval, final eval tables
    assert "| finished | True |" in md and "| params_trainable | 12,345 |" in md
    assert "| median tok/s | 1110 |" in md  # (10 steps at 1,020 ... 1,200: the mean of the middle two)
    assert "| train | 307 | 80,885 | 46,100 | 57.0% | 225 | 469 | 508 | 512 | 1 |" in md
    assert "| step | eval/loss | eval/ppl | eval/loss/banking77 | eval/loss/bitext |" in md
    assert "| 5 | 2.25 | 10 | 2.6 | 2.4 |" in md
    assert "| all | 1,234 | 4 | 54.58 | 2 | 7.388 | -2 |" in md  # LM: base vs fine-tuned, "all" first
    assert "| loglik | 0.75 | 0.7 | 40 | 0 |" in md and "| generate | 0.6 | 0.55 | 40 | 3 |" in md
    assert "| card_arrival | 0.8 | 0.9 | 0.85 | 20 |" in md and "| lost_card | 0.625 | 0.5 | 0.5556 | 20 |" in md
    assert "| greedy | 41.2 | 12.3 | 0.33 | 0.95 | 0.05 | 23.5 | 16 |" in md
    # samples: verbatim in Markdown (inside a fence longer than the sample's own backticks), escaped in HTML
    assert EVIL in md and "It ships in 3 days." in md and "````text\nuser: hi ```code```\n````" in md
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<td>card_arrival</td><td>0.8</td><td>0.9</td><td>0.85</td><td>20</td>" in html
    # plots linked by relative path
    for name in ("loss", "lr", "throughput", "mfu", "memory"):
        assert f"]({name}.png)" in md and f'<img src="{name}.png"' in html
    assert "Notes" not in md


def test_cli_out_and_samples(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main([str(run_dir), "--out", str(out), "--samples", "2"]) == 0
    assert "report written" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "Hi, how can I help?" in md and "THIRD SAMPLE" not in md
    assert (out / "loss.png").is_file() and not (run_dir / "report").exists()


@pytest.mark.parametrize("make", ["missing", "empty_dir", "empty_metrics"])
def test_unusable_run_dir_exits_2_with_one_sentence(tmp_path, capsys, make):
    run = tmp_path / "run"
    if make != "missing":
        run.mkdir()
    if make == "empty_metrics":
        (run / "metrics.jsonl").write_text("\n")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    expected = {"missing": f"{run} does not exist", "empty_dir": f"{run} has no metrics.jsonl: is it a dialtune run directory?",
                "empty_metrics": "has no metric rows yet"}[make]
    assert err.count("dialtune: error:") == 1 and expected in err and "Traceback" not in err
    assert not (run / "report").exists()


def test_metrics_without_eval_or_anything_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", _metrics_rows(with_eval=False, with_mfu=False))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # the half-written last line of a killed job
    written = write_report(run)
    assert set(written) == {"loss", "lr", "throughput", "memory", "markdown", "html"}  # no MFU column: no mfu.png
    _assert_png_not_blank(run / "report" / "loss.png")
    md = (run / "report" / "report.md").read_text()
    assert "| last logged step | 10 |" in md and "Held-out eval" not in md and "Latest evaluation" not in md
    assert "No summary.json" in md and "1 unreadable line(s) of metrics.jsonl were skipped." in md
    # a run stopped early: what is missing is said, with the command that makes it
    assert f"No merged/export_summary.json: the run has no merged checkpoint yet (`dialtune merge {run}`)." in md
    assert f"No eval/results.json: no end-of-training evaluation yet (`dialtune eval {run}`)." in md
    assert "No data_stats.json" in md


def test_a_sweeps_directory_names_its_jobs_and_a_jobs_report_its_values(tmp_path):
    from launch.report import ReportError

    sweep = tmp_path / "demo-sweep"
    for job, lr in (("0", "0.0001"), ("1", "0.0002"), ("10", "0.0003")):
        (sweep / job / "hydra").mkdir(parents=True)
        _write_jsonl(sweep / job / "metrics.jsonl", _metrics_rows(with_eval=False))
        (sweep / job / "hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- train.max_steps=10\n")
    (sweep / "multirun.yaml").write_text("{}\n")
    with pytest.raises(ReportError, match=rf"^{sweep} holds the runs of a sweep.*`dialtune report {sweep / '0'}` \(jobs: 0, 1, 10\)"):
        write_report(sweep)
    (sweep / "1" / "config.yaml").write_text("data:\n  eval_files: []\n  eval_fraction: 0.0\n  sources: []\neval:\n  intent_files: []\n")
    write_report(sweep / "1")
    md = (sweep / "1" / "report" / "report.md").read_text()
    assert md.startswith("# dialtune report: demo-sweep/1") and "| overrides | optim.lr=0.0002 train.max_steps=10 |" in md
    # nothing held out: the note does not send the user to an eval that has nothing to measure
    assert "No eval/results.json: the run has no held-out set or intent files to evaluate" in md


def test_a_directory_inside_a_run_names_the_run(run_dir):
    from launch.report import ReportError

    step = run_dir / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    for inside in (step, run_dir / "merged"):
        with pytest.raises(ReportError, match=rf"^{inside} lies inside the run directory {run_dir}: pass that"):
            write_report(inside)


def test_data_summary_names_sources_by_their_short_name():
    """W&B splits summary keys at slashes: a source's absolute path would become nested sections."""
    from train.metrics import data_summary

    stats = {"train": {"conversations": 3, "sources": {"/data/a/support.jsonl.gz": {"tokens": 10}, "/x/faq.jsonl": {"tokens": 5}}},
             "eval": {"sources": {"/data/b/support.jsonl": {"tokens": 2}}}, "max_seq_len": 512}
    # named over all the run's sources, as eval/loss/<source> is: the held-out support.jsonl is support_2 in both
    assert data_summary(stats) == {"data/train/conversations": 3, "data/train/sources/support/tokens": 10,
                                   "data/train/sources/faq/tokens": 5, "data/eval/sources/support_2/tokens": 2,
                                   "data/max_seq_len": 512}
    from train.evaluate import source_names

    paths = ["/data/a/support.jsonl.gz", "/x/faq.jsonl", "/data/b/support.jsonl"]
    assert source_names(paths)[2] == "support_2" and "data/eval/sources/support_2/tokens" in data_summary(stats, paths)

