"""Writing an export (a merge or a full fine-tune's weights) and telling which checkpoint an
export holds: shared by model/export.py and model/full_export.py.

An export is built in `<out_dir>.tmp` (export_tmp), completed there with its summary and model
card, then put in out_dir's place in renames (write_export): a crash leaves out_dir whole, the old
export or the new one. out_dir must be new, empty or an earlier export (check_out_dir).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from .card import GITATTRIBUTES, model_card, public_summary


class ExportError(RuntimeError):
    """An export that cannot be written, in one sentence saying why and what to do."""


def check_out_dir(out_dir: str) -> None:
    """An export replaces out_dir as a whole: refuse a directory that holds anything but an earlier
    export (e.g. `--out .` or `--out <run_dir>` would delete the checkpoints)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "export_summary.json")):
        raise ExportError(f"{out_dir} exists and holds other files than an export (no export_summary.json), which writing the "
                          f"export there would delete; pass a new or empty directory (--out).")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a directory; pass a new or empty directory (--out).")
    parent = os.path.dirname(os.path.abspath(out_dir))  # where the export is built (<out>.tmp) and moved into place
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".dialtune-write-check-", dir=parent))
    except OSError as e:
        raise ExportError(f"the export cannot be written to {out_dir} ({e.strerror or e}: {parent}); pass a directory you can "
                          "write to (--out).") from None


@contextmanager
def export_tmp(out_dir: str) -> Iterator[str]:
    """The directory an export of out_dir is built in (emptied first); removed when the block fails
    (write_export moves it into place when it succeeds)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cast_(model, dtype) -> None:
    for param in model.parameters():  # not .to(): buffers (RoPE's inv_freq) stay fp32, as from_pretrained keeps them
        param.data = param.data.to(dtype)


def write_export(tmp: str, out_dir: str, summary: Dict, cfg, peft_cfg, run_dir: Optional[str], eval_set, losses: Dict[str, float],
                 note: Optional[str], hub_repo_id: Optional[str], license: Optional[str]) -> Dict:
    """Complete the summary (held-out losses, config hash, note), write it and the model card next
    to the weights in tmp (push-ready with hub_repo_id), then put tmp in out_dir's place; returns
    the summary as written."""
    if eval_set is not None and losses:
        summary["eval"] = {"set": eval_set["path"], "conversations": eval_set["conversations"],
                           "target_tokens": eval_set["target_tokens"]}
        summary["eval_loss"] = losses
        summary["eval_ppl"] = {k: math.exp(min(v, 50)) for k, v in losses.items()}
    if run_dir:
        summary["config_sha256"] = sha256(os.path.join(run_dir, "config.yaml"))
    if note:
        summary["note"] = note
    if hub_repo_id:
        summary = public_summary({**summary, "hub_repo_id": hub_repo_id})
        with open(os.path.join(tmp, ".gitattributes"), "w") as f:
            f.write(GITATTRIBUTES)
    with open(os.path.join(tmp, "export_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(summary, cfg, peft_cfg, out_dir, hub_repo_id=hub_repo_id, license=license))
    # safetensors writes its files 0600: give them the mode of every other file (the umask's), so
    # that others on a shared cluster can read the export too
    umask = os.umask(0o022)
    os.umask(umask)
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    from train.signals import check_stop

    check_stop()  # (a SIGUSR1/SIGTERM during the merge that Python could not raise where it came)
    check_out_dir(out_dir)
    # the earlier export moves aside in one rename and goes after the new one is in place: a crash
    # leaves out_dir whole (old or new), never half-deleted
    old = out_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return summary


def base_eos_ids(base_path: Optional[str], revision: Optional[str] = None) -> List[int]:
    """The stop ids of the base's own generation_config.json (a local directory or a hub id's, from
    the cache or downloaded); [] when it has none."""
    if not base_path:
        return []
    path = os.path.join(base_path, "generation_config.json")
    if not os.path.isdir(base_path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(base_path, "generation_config.json", revision=revision)
        except Exception:  # noqa: BLE001 - none on the hub, offline without a cached copy: the tokenizer's EOS alone
            return []
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    eos = eos if isinstance(eos, list) else [eos]
    return [i for i in eos if isinstance(i, int)]


def write_generation_config(out: str, tokenizer, end_of_turn_token: Optional[str], base_path: Optional[str] = None,
                            revision: Optional[str] = None) -> List[int]:
    """generation_config.json in out: greedy, stopping at the base's own stop ids (its
    generation_config.json: e.g. Llama-3's <|eot_id|> and <|end_of_text|>), the tokenizer's EOS and
    the end-of-turn token; returns the stop ids."""
    from transformers import GenerationConfig

    from data_pipeline.chat import end_of_turn_id

    eot = end_of_turn_id(tokenizer, end_of_turn_token)
    eos = sorted({i for i in (*base_eos_ids(base_path, revision), tokenizer.eos_token_id, eot) if i is not None})
    gen = GenerationConfig(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, do_sample=False)
    gen.save_pretrained(out)
    return eos


def exported_from(out_dir: str) -> Optional[str]:
    """The checkpoint directory (<run_dir>/checkpoints/step_N) the export in out_dir was written
    from, as its export_summary.json names it; None when there is no export there."""
    try:
        with open(os.path.join(out_dir, "export_summary.json")) as f:
            summary = json.load(f)
        return summary.get("checkpoint") or os.path.dirname(os.path.normpath(summary["adapter"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_export_of(out_dir: str, ckpt_dir: str) -> bool:
    """Whether out_dir holds an export of ckpt_dir. A push-ready export names its checkpoint by its
    last path component only (the name is compared then), a push-ready merge not at all (yes)."""
    src = exported_from(out_dir)
    if src is None:
        return False
    if not src:
        return True
    if os.path.exists(src) and os.path.exists(ckpt_dir):
        return os.path.samefile(src, ckpt_dir)
    return os.path.basename(os.path.normpath(src)) == os.path.basename(os.path.normpath(ckpt_dir))


def sha256(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
