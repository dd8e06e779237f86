"""`dialtune eval <run_dir | checkpoint | merged checkpoint> [overrides]`: the eval suite
(train/evaluate.py) outside training, in one process, on the GPU when there is one.

- a run directory: the adapter of its latest checkpoint on the run's base (base vs fine-tuned
  held-out loss with the adapter disabled), with the run's data and eval settings;
- a checkpoint directory (<run_dir>/checkpoints/step_N): that checkpoint's adapter;
- a full fine-tune's run directory (peft=none): its merged/ (what `dialtune merge` wrote);
- a merged checkpoint (config.json): the merged model alone; its run's settings when it lies in
  a run directory (<run_dir>/merged), else the default config (the bundled sample data).
Overrides are `key=value` pairs on that config, e.g. `eval.intent_files=[intents.jsonl]
eval.decoding=[greedy,sampled] data.eval_files=[held_out.jsonl]`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional


class EvalError(Exception):
    """A user-fixable problem: one sentence, exit code 2."""


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="held-out loss per source, intent accuracy and response quality of a run or checkpoint")
    e.add_argument("path", help="run directory, checkpoint directory (checkpoints/step_N) or merged checkpoint")
    e.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.intent_files=[intents.jsonl] eval.decoding=[greedy,sampled]")
    e.add_argument("--parts", default=None, help="comma-separated parts: lm,intent,response (default: eval.at_end)")
    e.add_argument("--out", default=None, help="output directory (default: the run directory's eval/, also for one of its checkpoints; <folder>-eval beside a merged checkpoint outside a run)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    e.set_defaults(fn=cmd_eval)


def _run_config(run_dir: Path, overrides: List[str]):
    from omegaconf import OmegaConf

    from train.config import DialtuneConfig

    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / "config.yaml"
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DialtuneConfig), OmegaConf.load(path))
    except OmegaConfBaseException as e:  # e.g. a key an older dialtune wrote and this one dropped
        raise EvalError(f"{path}: {_key_problem(e)} for this version of dialtune (written by another "
                        "version?); delete or fix that line, or pass the checkpoint to an older dialtune.") from None
    from train.config import CONF_DIR

    for o in overrides:  # a config group (logger=none) is a choice only training composes: its keys are what eval takes
        group = o.lstrip("+").split("=", 1)[0]
        if "." not in group and (CONF_DIR / group).is_dir():
            raise EvalError(f"{o} chooses a config group, which only training composes; `dialtune eval` takes key=value "
                            f"overrides of the run's config.yaml, e.g. {group}.<key>=<value> (`dialtune config-doc` lists them).")
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        except OmegaConfBaseException as e:
            raise EvalError(f"override {' '.join(overrides)}: {_key_problem(e)}; see README's configuration "
                            "reference for the keys.") from None
    return cfg


def _key_problem(e) -> str:
    """'key export.x is not known' / 'export.x=abc is not valid' from an OmegaConf error."""
    key = getattr(e, "full_key", None) or "?"
    if type(e).__name__ == "ConfigKeyError":
        return f"key {key} is not known"
    return f"{key} has an invalid value ({str(e).splitlines()[0]})"


def _export_run_dir(merged: Path) -> Optional[Path]:
    """The run directory an export's export_summary.json names, when it is there (a push-ready
    export names only its last component: not found)."""
    try:
        run_dir = Path(json.loads((merged / "export_summary.json").read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_dir if run_dir.is_absolute() and (run_dir / "config.yaml").is_file() else None


def held_out_only(d):
    """The data config an eval reads: without data.eval_fraction the held-out set is the held-out
    files alone, built without the training files (one that has moved since, or 17k conversations
    to tokenize, must not stop or slow an eval); with it, it is drawn from them, so all are read.
    The held-out rows are the same either way."""
    if d.eval_fraction > 0:
        return d
    from omegaconf import OmegaConf

    d = OmegaConf.create(OmegaConf.to_container(d, resolve=True))
    d.train_files = []
    d.sources = [s for s in d.sources if s.split == "eval"]
    return d


def resolve(path: str, overrides: List[str], run_cfg=None):
    """(cfg, kind, model_dir, adapter_dir, base_path, out_dir) for what the user pointed at.
    run_cfg: the run's config when the caller read it already (each config.yaml is read once)."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"{path} does not exist; pass a run directory, a checkpoint directory or a merged checkpoint.")
    if (p / "config.json").is_file():  # merged checkpoint
        from train.validate import model_dir_problem

        problem = model_dir_problem(str(p), what="the merged checkpoint")
        if problem:
            raise EvalError(problem)
        run_dir = p.parent if (p.parent / "config.yaml").is_file() else None
        home = run_dir or _export_run_dir(p)  # an export written elsewhere (--out) names the run it came from
        if home is not None:
            cfg = run_cfg if run_cfg is not None else _run_config(home, overrides)
        else:
            print(f"dialtune: note: {p} is neither inside a run directory nor names one (export_summary.json's run_dir): it is "
                  "evaluated with the default config's data and settings (the bundled sample); pass overrides (e.g. "
                  "data.eval_files=[...] data.max_seq_len=...) to match how it was trained", file=sys.stderr)
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            from launch.prepare import compose, compose_problem

            try:
                cfg = compose(overrides)
            except (HydraException, OmegaConfBaseException) as e:
                raise EvalError(compose_problem(e, overrides)) from None
        # outside a run directory, beside the export: its folder stays what was exported (one to upload as it is)
        return cfg, "merged", p, None, None, (run_dir / "eval" if run_dir else p.parent / f"{p.name}-eval")
    if ((p / "adapter").is_dir() or (p / "trainer_state.json").is_file()) and (p.parent.parent / "config.yaml").is_file():
        run_dir, adapter = p.parent.parent, p / "adapter"
        cfg = _run_config(run_dir, overrides)
    elif (p / "config.yaml").is_file():
        run_dir = p
        cfg = _run_config(run_dir, overrides)
        if (p / "merged" / "config.json").is_file() and cfg.peft.method == "none":
            return resolve(str(p / "merged"), overrides, cfg)  # a full fine-tune: its weights are what `dialtune merge` wrote
        latest = p / "checkpoints" / "latest"
        if not latest.is_file():
            raise EvalError(f"run directory {p} has no finished checkpoint yet; train longer or pass a checkpoint directory.")
        adapter = p / "checkpoints" / latest.read_text().strip() / "adapter"
    else:
        raise EvalError(f"{path} is neither a dialtune run directory (config.yaml), a checkpoint (adapter/) nor a merged checkpoint (config.json).")
    if cfg.peft.method == "none":
        which = f" --checkpoint {adapter.parent.name} --out {adapter.parent / 'merged'}" if p != run_dir else ""
        raise EvalError(f"{run_dir} is a full fine-tune (peft=none): its checkpoints hold DeepSpeed's weights, not an adapter; "
                        f"write them as a model with `dialtune merge {run_dir}{which}` and evaluate {adapter.parent / 'merged' if which else run_dir / 'merged'}.")
    if not adapter.is_dir():
        raise EvalError(f"{adapter} does not exist; pass a checkpoint directory that holds adapter/, or the merged checkpoint.")
    from model.export_run import ExportError, run_base

    try:
        base = run_base(cfg, str(run_dir))  # (a tiny run copied without its base/: rebuilt)
    except ExportError as e:
        raise EvalError(str(e)) from None
    from model.base_identity import checkpoint_problem

    if problem := checkpoint_problem(str(adapter.parent), base, cfg):
        raise EvalError(problem)
    return cfg, "adapter", adapter, adapter, base, run_dir / "eval"


def load_model(cfg, kind: str, model_dir: Path, base: Optional[str], dev):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import loader

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if kind == "merged":
        dtype = torch.float32 if dev.type == "cpu" else "auto"  # CPU: bf16 matmuls are slow or missing
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval(), tokenizer
    from peft import PeftModel

    if dev.type == "cpu" and cfg.quant.mode == "none":
        cfg.model.dtype = "fp32"
    model = loader.load_base(cfg, base, dev)
    model = loader.fit_embeddings(model, tokenizer)
    model = PeftModel.from_pretrained(model, str(model_dir)).to(dev).eval()
    from model.dequantize import fast_int8

    if fast_int8(cfg):  # the run trained through bf16 GEMMs of its dequantized int8 weights: evaluate that model
        from model.kernels import dequantize_int8_linears

        dequantize_int8_linears(model)
    return model, tokenizer


def _step_of(model_dir: Path) -> Optional[int]:
    """The training step of a checkpoint (its trainer_state.json; <ckpt>/adapter is passed) or of a
    merged export (the checkpoint its export_summary.json names, step_N), or None."""
    for d in (Path(model_dir), Path(model_dir).parent):
        try:
            return int(json.loads((d / "trainer_state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        name = Path(json.loads((Path(model_dir) / "export_summary.json").read_text())["checkpoint"]).name
        return int(name[len("step_"):]) if name.startswith("step_") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_world_size(model_dir: Path) -> int:
    """How many ranks trained the run that model_dir belongs to (its summary.json), else 1."""
    for d in list(Path(model_dir).parents)[:3]:
        try:
            return int(json.loads((d / "summary.json").read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 1


def cmd_eval(args) -> int:

    from data_pipeline.chat import DataError, apply_named_template, end_of_turn_id
    from data_pipeline.cache import eval_conversations, prepare_cached
    from data_pipeline.dataset import sources_of
    from train import eval_results
    from train import evaluate as suite
    from train.config import ConfigError
    from train.validate import validate_data, validate_eval

    try:
        cfg, kind, model_dir, adapter, base, out = resolve(args.path, args.overrides)
        parts = args.parts.split(",") if args.parts else list(cfg.eval.at_end)
        bad = [x for x in parts if x not in suite.PARTS]
        if bad:
            raise EvalError(f"--parts has {bad[0]!r}; parts are {', '.join(suite.PARTS)}.")
        validate_eval(cfg.eval, max_seq_len=cfg.data.max_seq_len, parts=parts)
        world = _run_world_size(model_dir)
        if "lm" in parts and cfg.eval.lm_max_batches and world > 1 and not any(
                o.lstrip("+").startswith("eval.lm_max_batches=") for o in args.overrides):
            # per rank in training: the run's ranks read its first lm_max_batches x world micro-batches; so does this one process
            print(f"dialtune: eval.lm_max_batches={cfg.eval.lm_max_batches} per rank over the run's {world} ranks: reading the same "
                  f"first {cfg.eval.lm_max_batches * world} micro-batches", file=sys.stderr)
            cfg.eval.lm_max_batches *= world
        from launch.chat import _first_line, pick_device

        try:
            dev = pick_device(args.device)
        except ValueError as e:
            raise EvalError(str(e)) from None
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, tokenizer = load_model(cfg, kind, model_dir, base, dev)
        except (ConfigError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - corrupt or partial weights, a base that is not there ...
            raise EvalError(f"{model_dir} could not be loaded ({_first_line(e)}); check that its files are complete "
                            "(re-run `dialtune merge`, or pass another checkpoint).") from None
        apply_named_template(tokenizer, None)
        eot = end_of_turn_id(tokenizer, cfg.model.end_of_turn_token)
        eval_ds, texts, names = None, [], []
        data = held_out_only(cfg.data)
        if {"lm", "response"} & set(parts) and sources_of(data):  # (nothing held out: those parts say so below)
            validate_data(data, training=False)
            _, eval_ds, _, _, data_path = prepare_cached(data, tokenizer, eot, log=lambda m: print(m, file=sys.stderr))
            texts = eval_conversations(data_path) if eval_ds is not None else []
            run_sources = sources_of(cfg.data)  # the names the run's tables use; the rows count the built config's sources
            names = suite.source_names([s["path"] for s in run_sources])
            if data is not cfg.data:  # (its sources: the run's held-out ones, in their order)
                names = [n for s, n in zip(run_sources, names) if s["split"] == "eval"]
        # a full fine-tune's base, measured by training before its first step
        base_rows = (eval_results.read_base_rows(str(model_dir.parent / "eval"))
                     if kind == "merged" and cfg.peft.method == "none" and cfg.eval.base_comparison else None)
        res = suite.run_suite(parts, model=model, forward=model, tokenizer=tokenizer, eot=eot, cfg=cfg.eval,
                              eval_ds=eval_ds, sources=names, conversations=texts, pad_id=tokenizer.pad_token_id,
                              micro_batch_size=cfg.train.micro_batch_size, max_len=cfg.data.max_seq_len, world=1, rank=0,
                              dev=dev, base_ctx=model.disable_adapter if adapter is not None and cfg.eval.base_comparison else None,
                              intent_cfg=cfg.data.intent, progress=sys.stderr.isatty(), base_rows=base_rows)
    except (EvalError, ConfigError, DataError) as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    if not res:  # every part asked for had nothing: say why, part by part
        held_out = "no held-out set (data.eval_files / data.eval_fraction)"
        why = {"lm": held_out, "intent": "no eval.intent_files",
               "response": "eval.response_conversations=0" if cfg.eval.response_conversations <= 0 else held_out if not texts
               else "no held-out conversation has an assistant reply after a user turn"}
        print(f"dialtune: error: nothing to evaluate ({'; '.join(f'{p}: {why[p]}' for p in parts)}); pass what is missing "
              "as an override.", file=sys.stderr)
        return 2
    try:
        if kept := eval_results.keep_earlier(str(args.out or out)):
            print(f"dialtune: note: the results this replaces are kept in {kept}", file=sys.stderr)
        paths = eval_results.write(res, str(args.out or out), _step_of(model_dir), str(model_dir))
    except OSError as e:
        print(eval_results.tables_text(res))
        print(f"dialtune: error: cannot write the results to {args.out or out} ({e}); the tables are above, pass --out DIR "
              "to write them elsewhere.", file=sys.stderr)
        return 2
    print(eval_results.tables_text(res))
    print(f"dialtune: eval results written to {paths['results']}")
    return 0


def main(argv=None) -> int:
    """`python -m launch.evaluate ...` = `dialtune eval ...`."""
    from launch.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
