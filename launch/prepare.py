"""`dialtune prepare <overrides>`: validate, tokenize, pack and cache the data of a config,
ahead of (or instead of) the first training job, and print the dataset report."""
from __future__ import annotations

import sys
from typing import Optional


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch.train import normalize_argv
    from train.config import CONF_DIR, absolute_paths, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=normalize_argv(list(overrides)))
    absolute_paths(cfg)  # (as training records them: `dialtune prepare` fills the cache key training reads)
    return cfg


def compose_problem(e: Exception, overrides) -> str:
    """One sentence for a Hydra/OmegaConf composition error: an unknown key with the nearest real
    one (train/validate.py's unknown_key_problem), a value of the wrong type
    (launch/evaluate.py's _key_problem), else the override and the first line of the error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from launch.evaluate import _key_problem
    from train.validate import unknown_key_problem

    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        # inside a list item (data.sources=[{...}]) OmegaConf names the item's key alone: say where
        keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
        named = key in keys
        inside = [o for o, k in zip(overrides, keys) if str(key).startswith((k + "[", k + "."))]  # optim.betas[1]
        lists = [o for o in overrides if "=[" in o or "={" in o]  # a list item's field is named alone: the lists' overrides
        where = "" if named else f"{' '.join(inside or lists or overrides)}: "
        problem = None
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            try:
                problem = unknown_key_problem(OmegaConf.from_dotlist([f"{key}=0"]))
            except Exception:  # not a plain dotted key
                problem = None
            if not named:  # a list item's field (data.sources=[{...}]): the nearest field of such items
                import difflib

                from train.config import iter_docs

                fields = sorted({k.split("[].", 1)[1] for k, *_ in iter_docs() if "[]." in k})
                near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
                if near:
                    problem = f"{key} is not a field of a list item here (did you mean {near[0]}?); `dialtune config-doc` lists them all."
        return where + (problem or f"{_key_problem(cause)}; `dialtune config-doc` lists every key with its type.")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    rest = [ln.strip() for ln in str(e).split("Config search path")[0].splitlines()[1:] if ln.strip()]
    more = f" ({(rest[0] + ' ' + ', '.join(rest[1:])).strip()})" if rest else ""
    return (f"cannot compose the config from {' '.join(overrides) or 'the defaults'}: {first.rstrip('.')}{more}; "
            "check the override's key, value and syntax (key=value).")


def _first_job(override: str) -> Optional[str]:
    """The override as a sweep's first job has it (a,b / range / choice: Hydra's own parser says;
    key=a for key=a,b), None for a key of Hydra's own config (hydra.*, hydra/...), which Hydra
    checks itself, or a sweep without a first value (glob, interval); an override that is no sweep,
    or that does not parse, as given (composing it reports the error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if override.lstrip("+~").startswith("hydra"):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
    except HydraException:
        return override  # composing it says what is wrong
    if not parsed.is_sweep_override():
        return override
    try:
        return f"{parsed.get_key_element()}={next(iter(parsed.sweep_string_iterator()))}"
    except Exception:  # noqa: BLE001 - glob(...), interval(...): no first value to compose alone (Hydra's job)
        return None


def sweep_without_m(overrides) -> Optional[str]:
    """One sentence for a sweep given without -m (Hydra would stop the job with 'Ambiguous value')."""
    if any(o in ("-m", "--multirun") for o in overrides):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for o in overrides:
        if o.lstrip("+~").startswith("hydra"):
            continue
        try:
            sweep = OverridesParser.create().parse_overrides([o])[0].is_sweep_override()
        except HydraException:
            sweep = False
        if sweep:
            return (f"{o} lists several values, which Hydra runs one job each only with -m: add -m (a sweep), or quote a "
                    f"value that holds a comma ('{o.partition('=')[0]}=\"...\"').")
    return None


def plain_overrides(overrides) -> list:
    """The overrides of a sweep's first job, without -m/--multirun and Hydra's own keys: one job's
    config, composable alone (so a typo in a swept key, or a bad first value, is found too)."""
    return [first for o in overrides if o not in ("-m", "--multirun") and (first := _first_job(o)) is not None]


SWEEP_CHECKED_JOBS = 32  # (each is composed and validated, ~0.2 s: a bigger sweep's later jobs check themselves)


def sweep_jobs(overrides) -> list:
    """The overrides of each job of a -m sweep, in Hydra's basic sweeper's order (the cartesian
    product of the swept values: job N is <run.name>-sweep/N), Hydra's own keys left out; [] when
    it is no sweep or a value list Hydra expands itself (glob) is in it."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not any(o in ("-m", "--multirun") for o in overrides):
        return []
    keys = {}
    for o in overrides:
        if o in ("-m", "--multirun") or o.lstrip("+~").startswith("hydra"):
            continue
        try:
            parsed = OverridesParser.create().parse_overrides([o])[0]
            key = parsed.get_key_element()
            keys[key] = [f"{key}={v}" for v in parsed.sweep_string_iterator()] if parsed.is_sweep_override() else [o]
        except Exception:  # noqa: BLE001 - glob(...), or no parse (composing the first job reports it)
            return []
    return [list(job) for job in itertools.product(*keys.values())]


def _job_problem(job, validate: bool, **validate_kw):
    """(config, None) for one job's overrides that compose (and with validate, can run); else
    (config or None, compose_problem's / _bool_problem's / train/validate.py's sentence)."""
    from train.config import ConfigError
    from train.validate import validate as validate_config

    try:
        cfg = compose(job)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf composition errors: one sentence
        return None, compose_problem(e, job)
    if problem := _bool_problem(job):
        return cfg, problem
    if validate:
        try:
            validate_config(cfg, **validate_kw)
        except ConfigError as e:
            return cfg, str(e)
    return cfg, None


def _later_job_problem(overrides, **validate_kw) -> Optional[str]:
    """The first sentence a later job of a sweep (up to SWEEP_CHECKED_JOBS) gets from composing or
    validating its config (_job_problem), naming the job; None when they all can run."""
    jobs = sweep_jobs(overrides)
    for n, job in enumerate(jobs[1:SWEEP_CHECKED_JOBS], start=1):
        if problem := _job_problem(job, True, **validate_kw)[1]:
            swept = ", ".join(o for o, first in zip(job, jobs[0]) if o != first)
            return f"sweep job {n} of {len(jobs)} ({swept}): {problem}"
    return None


def _bool_problem(overrides) -> Optional[str]:
    """OmegaConf takes any integer for a bool (data.packing=2 is true): only true/false (and
    yes/no, on/off, 1/0) are; anything else is one sentence."""
    from train.config import iter_docs

    bools = {key for key, tname, *_ in iter_docs() if tname == "bool"}
    for o in overrides:
        key, sep, value = o.lstrip("+").partition("=")
        if sep and key in bools and value.strip().strip("'\"").lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return f"{key}={value} is not a boolean: use true or false."
    return None


def override_problem(overrides, validate: bool = False, root: bool = False, **validate_kw) -> Optional[str]:
    """compose_problem's sentence when the overrides (a sweep's first job) do not compose, and with
    validate, train/validate.py's when the config (every job of a sweep) cannot run (validate_kw: its options); with root,
    the run.root and run directory that Hydra could not create (run_dir_problem); else None. None too when Hydra flags
    other than -m are given (--cfg, --help, -cn ...: Hydra's own business)."""
    from launch.train import normalize_argv

    overrides = normalize_argv(list(overrides))  # drops the --local_rank=N the deepspeed launcher appends
    if any(o.startswith("-") and o not in ("-m", "--multirun") for o in overrides):
        return None
    if problem := sweep_without_m(overrides):
        return problem
    cfg, problem = _job_problem(plain_overrides(overrides), validate, **validate_kw)
    if problem:
        return problem
    if validate and (problem := _later_job_problem(overrides, **validate_kw)):
        return problem
    # (plain holds no hydra.* override: a given hydra.run.dir / hydra.sweep.dir leaves run.root unused)
    if root and not any(o.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
        from train.validate import directory_problem

        return directory_problem("run.root", str(cfg.run.root)) or run_dir_problem(
            str(cfg.run.root), str(cfg.run.name), sweep="-m" in overrides or "--multirun" in overrides)
    return None


def run_dir_problem(root: str, name: str, sweep: bool = False) -> Optional[str]:
    """One sentence when Hydra could not create the run directory <run.root>/<run.name> (a sweep's
    <run.name>-sweep) in a usable run.root: something there that is not a directory, a name the
    file system refuses, a directory not writable. Creates it, as Hydra does next; else None."""
    import os

    from train.validate import unusable_directory

    path = os.path.join(root, f"{name}-sweep" if sweep else name)
    what = f"run.name={name!r}: the run directory <run.root>/<run.name>{'-sweep' if sweep else ''}, {path!r},"
    why, detail = unusable_directory(path) or (None, "")
    fix = "choose another run.name (or run.root)"
    if why is None and not sweep:  # (before Hydra writes its record into a directory another training holds)
        from train.run_lock import in_use_problem

        return in_use_problem(path)
    return {"file": f"{what} exists and is not a directory; {fix}, or move it away.",
            "create": f"{what} cannot be created ({detail}); {fix}.", "write": f"{what} is not writable; {fix}."}.get(why)


def report_text(stats) -> str:
    from data_pipeline.validate import counts_text

    lines = []
    v = stats["validation"]
    lines.append(f"records read {v['records_read']}, kept {v['records_kept']}, skipped {sum(v['skipped'].values())}"
                 + (f" ({counts_text(v['skipped'])})" if v["skipped"] else "") + (f", repaired {counts_text(v['repaired'])}" if v["repaired"] else ""))
    t = stats["truncation"]
    lines.append(f"truncation ({t['policy']}): {t['truncated']} truncated ({t['truncated_share']:.1%}"
                 + (f"; {t['cut']} cut inside a turn" if t.get("cut") else "") + f"), {t['dropped']} dropped")
    for split in ("train", "eval"):
        if split not in stats:
            continue
        s = stats[split]
        ln = s["length"]
        lines.append(f"{split}: {s['conversations']} conversations, {s['tokens']} tokens, {s['target_share']:.1%} targets; "
                     f"length p50 {ln['p50']:.0f} p90 {ln['p90']:.0f} p99 {ln['p99']:.0f} max {ln['max']}")
        for path, src in s["sources"].items():
            drawn = f" of {src['unweighted']}" if src.get("unweighted", src["conversations"]) != src["conversations"] else ""
            lines.append(f"  {path}: {src['conversations']} conversations, {src['tokens']} tokens"
                         + (f" (weight {src['weight']}{drawn})" if split == "train" else ""))  # (weights mix training only)
    if "packing" in stats:
        p = stats["packing"]
        lines.append(f"packing: {p['rows']} rows, fill ratio {p['fill_ratio']:.1%}, {p['docs_per_row']:.2f} conversations/row")
    return "\n".join(lines)


def main(overrides) -> int:
    from data_pipeline.chat import DataError, apply_named_template, end_of_turn_id
    from data_pipeline.cache import prepare_cached
    from model import loader
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import ConfigError
    from train.validate import unknown_key_problem, validate_data

    try:
        try:
            cfg = compose(overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(compose_problem(e, overrides)) from None
        problem = unknown_key_problem(cfg) or _bool_problem(overrides)  # (a +key=value Hydra added, typo or not)
        if problem:
            raise ConfigError(problem)
        validate_data(cfg.data)
        tokenizer = loader.load_tokenizer(cfg.model)
        apply_named_template(tokenizer, cfg.data.chat_template)
        eot = end_of_turn_id(tokenizer, cfg.model.end_of_turn_token)
        _, _, _, stats, path = prepare_cached(cfg.data, tokenizer, eot, 0, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, DataError) as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    print(report_text(stats))
    print(f"cache {'hit' if stats['cache']['hit'] else 'written'}: {path}")
    return 0
