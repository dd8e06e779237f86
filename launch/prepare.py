"""`dialtune prepare <overrides>`: validate, tokenize, pack and cache the data of a config,
ahead of (or instead of) the first training job, and print the dataset report."""
from __future__ import annotations

import sys


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from launch.train import normalize_argv
    from train.config import CONF_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=normalize_argv(list(overrides)))


def report_text(stats) -> str:
    lines = []
    v = stats["validation"]
    lines.append(f"records read {v['records_read']}, kept {v['records_kept']}, skipped {sum(v['skipped'].values())}"
                 + (f" {v['skipped']}" if v["skipped"] else "") + (f", repaired {v['repaired']}" if v["repaired"] else ""))
    t = stats["truncation"]
    lines.append(f"truncation ({t['policy']}): {t['truncated']} truncated ({t['truncated_share']:.1%}), {t['dropped']} dropped")
    for split in ("train", "eval"):
        if split not in stats:
            continue
        s = stats[split]
        ln = s["length"]
        lines.append(f"{split}: {s['conversations']} conversations, {s['tokens']} tokens, {s['target_share']:.1%} targets; "
                     f"length p50 {ln['p50']:.0f} p90 {ln['p90']:.0f} p99 {ln['p99']:.0f} max {ln['max']}")
        for path, src in s["sources"].items():
            lines.append(f"  {path}: {src['conversations']} conversations, {src['tokens']} tokens (weight {src['weight']})")
    if "packing" in stats:
        p = stats["packing"]
        lines.append(f"packing: {p['rows']} rows, fill ratio {p['fill_ratio']:.1%}, {p['docs_per_row']:.2f} conversations/row")
    return "\n".join(lines)


def main(overrides) -> int:
    from data_pipeline.chat import DataError, apply_named_template, end_of_turn_id
    from data_pipeline.dataset import prepare_cached
    from model import loader
    from train.config import ConfigError
    from train.validate import validate_data

    try:
        cfg = compose(overrides)
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
