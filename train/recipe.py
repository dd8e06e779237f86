"""The fine-tuning recipe, top to bottom: setup, data, model, engine, loop, checkpoint, export.

Loss normalisation: each optimizer step minimises  sum(token CE over all target tokens of all
micro-batches on all ranks) / (number of those target tokens).  The target-token count N of the
whole step is all-reduced *before* the forward passes, every micro-batch's summed CE is scaled by
world_size / N, and DeepSpeed's own 1/gas scaling is turned off (scale_wrt_gas=False); DeepSpeed
averages gradients over ranks (1/world_size), which the world_size factor cancels.  Long and
short conversations thus weigh by their tokens, whatever the padding, accumulation or ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Dict

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from data_pipeline import batching
from data_pipeline.chat import DataError, apply_named_template, end_of_turn_id
from data_pipeline.cache import eval_conversations, prepare_cached
from data_pipeline.dataset import sources_of
from data_pipeline.packing import collate_packed
from model import attention, base_identity, fused_lora, kernels, levers, loader, memory

from . import checkpoint, distributed, eval_results, faults, flops, optim, resume, run_lock, signals
from . import evaluate as suite
from .config import ConfigError
from .ds_config import lr_lambda, mixed_precision, render
from .metrics import Metrics, data_summary, memory_gb

log = logging.getLogger("dialtune")


def _data_log(line: str) -> None:
    """prepare_cached's lines: its data warnings (skipped, dropped, truncated, leaking) as warnings."""
    level, text = (logging.WARNING, line[len("warning: "):]) if line.startswith("warning: ") else (logging.INFO, line)
    log.log(level, text)


def run(cfg, run_dir: str) -> Dict[str, Any]:
    import deepspeed

    # ---- setup --------------------------------------------------------------------------------
    stop_flag = signals.install()  # from the start: SIGUSR1 during data preparation or loading stops at step 1
    rank, local_rank, world = distributed.init(cfg.deepspeed.timeout_minutes)
    dev = distributed.device(local_rank)
    is_main = rank == 0
    t = cfg.train
    os.makedirs(run_dir, exist_ok=True)
    if problem := distributed.shared_dir_problem(run_dir, rank, dev):
        raise ConfigError(problem)
    run_lock.claim_for_all(run_dir, rank)  # (before anything of an earlier run's is set aside or replaced)
    deepspeed.runtime.utils.set_random_seed(t.seed)
    mb, gas = t.micro_batch_size, t.grad_accum
    if t.global_batch_size:
        if t.global_batch_size % (mb * world):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size {mb} x {world} ranks; "
                              f"use a multiple of {mb * world}.")
        gas = cfg.train.grad_accum = t.global_batch_size // (mb * world)  # the global size wins (in config.yaml too)
        if is_main:
            log.info("global batch %d = micro %d x accumulation %d x %d ranks", t.global_batch_size, mb, gas, world)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # (<run_dir>/config.yaml once the run is sure to start: resume checks)
    earlier_config = resume.read_text(os.path.join(run_dir, "config.yaml")) if is_main else None  # (an earlier run's: set aside with its results)

    base_path = cfg.model.name_or_path
    if base_path == "tiny":
        try:
            base_path = loader.tiny_base(cfg.model, run_dir, build=is_main)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        distributed.barrier()
    tokenizer = loader.load_tokenizer(cfg.model, base_path if cfg.model.name_or_path == "tiny" else None)
    apply_named_template(tokenizer, cfg.data.chat_template)
    eot = end_of_turn_id(tokenizer, cfg.model.end_of_turn_token)

    # ---- data ---------------------------------------------------------------------------------
    failed = None
    try:
        train_ds, eval_ds, packs, data_stats, data_path = prepare_cached(cfg.data, tokenizer, eot, local_rank,
                                                                         log=_data_log if is_main else (lambda *_: None))
    except Exception as e:  # noqa: BLE001 - (a node-local cache's build can fail on one node only)
        failed = e
    if problem := distributed.agree(distributed.as_problem(failed)):
        if failed is not None and not isinstance(failed, (DataError, ConfigError)):
            raise failed
        raise (type(failed) if failed else DataError)(problem)
    for key, off in [("eval.early_stopping_patience", "0"), ("export.checkpoint", "last")]:
        if eval_ds is None and str(OmegaConf.select(cfg, key)) != off:
            raise ConfigError(f"{key} watches the held-out loss, and this run has no held-out set: set data.eval_fraction or "
                              f"data.eval_files (or a source with split: eval), or {key}={off}.")
    if cfg.eval.intent_files and "intent" in {*cfg.eval.during_training, *cfg.eval.at_end}:  # a bad file stops now, not after training
        suite.load_intents(cfg.eval.intent_files, cfg.data.intent, cfg.eval.intent_max_examples, cfg.eval.intent_labels)
    n_items = len(packs) if packs is not None else len(train_ds)  # packed rows, or conversations
    if batching.epoch_steps(n_items, mb, world, gas, 1) == 0:
        what = "packed rows" if packs is not None else "conversations"
        raise ConfigError(f"the training set has {n_items} {what}, fewer than one optimizer step needs "
                          f"(micro_batch_size {mb} x grad_accum {gas} x {world} ranks); lower train.micro_batch_size or train.grad_accum.")
    # the packed-row layout for collate_packed, and the attention path (set once the model is loaded)
    layout = {"attn": cfg.model.attn_implementation, "window": None, "path": cfg.model.attn_implementation}

    def make_batch(indices):
        """(batch, token lengths of its conversations) - the lengths feed the FLOPs count."""
        if packs is None:
            b = batching.collate(batching.fetch(train_ds, indices), pad_id)
            return b, b["attention_mask"].sum(1).tolist()
        rows = [batching.fetch(train_ds, m if i >= 0 else [-1]) for i, m in zip(indices, packs[[max(i, 0) for i in indices]]["members"])]
        return (collate_packed(rows, pad_id, layout["attn"], dtype=loader.DTYPES[mixed_precision(cfg)],
                               sliding_window=layout["window"], pad_to=cfg.data.max_seq_len if cfg.kernels.compile else None),
                [len(d["input_ids"]) for row in rows for d in row])
    total_steps = t.max_steps if t.max_steps > 0 else batching.epoch_steps(n_items, mb, world, gas, t.epochs)
    pad_id = tokenizer.pad_token_id

    # ---- model --------------------------------------------------------------------------------
    if cfg.peft.method == "none" and dev.type == "cuda" and (too_big := memory.full_finetune_problem(
            cfg, loader.parameter_count(cfg, base_path), world, torch.cuda.get_device_properties(dev).total_memory)):
        raise ConfigError(too_big)  # before loading and before DeepSpeed allocates the states: one sentence, not a CUDA OOM
    if (too_long := loader.context_problem(loader.model_config(cfg, base_path), cfg.data.max_seq_len)) and is_main:  # (may raise)
        log.warning(too_long)
    model = loader.load_base(cfg, base_path, dev)
    model = loader.fit_embeddings(model, tokenizer)
    kc = cfg.kernels
    try:
        model, ran = levers.apply(model, cfg, dev, loader.DTYPES[mixed_precision(cfg)], layout if packs is not None else None,
                                  log.info if is_main else (lambda *_: None))
    except levers.LeverError as e:
        raise ConfigError(str(e)) from None
    model_config = flops.countable(model.config, log if is_main else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    optimizer = optim.build(cfg.optim, trainable, dev)
    skip_update = optim.SkipSwitch(optimizer)  # (a skipped non-finite step changes no weight and no optimizer state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    with optim.without_initial_step(optimizer, active=cfg.deepspeed.stage == 0 and mixed_precision(cfg) != "fp32"):
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=render(cfg, world))
    no_fused = kernels.fused_ce_unsupported(engine) if kc.fused_ce else "kernels.fused_ce=false"
    if is_main and kc.fused_ce and no_fused:
        log.info("fused cross-entropy off: %s; computing full logits", no_fused)
    peak = flops.peak_flops(dev, loader.DTYPES[mixed_precision(cfg)], kc.peak_tflops * 1e12 or None)

    def forward_ce(b):
        """(summed CE over the batch's targets, the model output)."""
        inputs = batching.model_inputs(b, dev)
        labels = b["labels"].to(dev)
        with attention.packed_forward() if layout["path"] == "varlen" else contextlib.nullcontext():
            if no_fused:
                out = engine(**inputs)
                return kernels.token_ce_sum(out.logits, labels), out
            with kernels.hidden_states_as_logits(engine) as head:
                out = engine(**inputs)  # out.logits holds the final hidden states here
        return kernels.chunked_linear_ce_sum(out.logits, head, labels, chunk_size=kc.ce_chunk_size), out

    # ---- resume -------------------------------------------------------------------------------
    ckpt_root = os.path.join(run_dir, "checkpoints")
    state = {"step": 0, "epoch": 0, "pos": 0, "target_tokens_seen": 0, "data_key": os.path.basename(data_path),
             "base": base_identity.of_run(cfg, base_path)}  # (what a resume, merge or eval of its adapter compares)
    if is_main:
        checkpoint.clean_partial(ckpt_root)
    distributed.barrier()
    try:
        found = resume.find_resume(t.resume, ckpt_root)
    except ValueError as e:  # checkpoints/latest naming a checkpoint that is gone
        raise ConfigError(str(e)) from None
    # this run's own checkpoint continues it (metrics, W&B run); another run's only gives the start
    own = bool(found) and os.path.realpath(found[0]) == os.path.realpath(ckpt_root)
    if found:
        resumed = resume.resume(engine, *found, cfg, scheduler, total_steps, state["data_key"], is_main, world, mb, gas, n_items, base_path)
        state = {**resumed, "base": resumed.get("base") or state["base"]}  # (a checkpoint of before the record: this base's)
    if is_main and not own:  # a new run here: an earlier run's results set aside (its checkpoints stay, with a note)
        resume.set_aside_earlier(run_dir, earlier_config)  # (its checkpoints too)
        if t.resume == "auto":
            log.info("train.resume=auto: no finished checkpoint in %s yet; starting at step 1", ckpt_root)
    if is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
    state.update(world_size=world, micro_batch_size=mb, grad_accum=gas,  # what pos counts in (resume.resume_position)
                 slurm_job_id=os.environ.get("SLURM_JOB_ID"))  # a requeue of this job continues from it (resume.find_resume)
    last_step = state["step"] if checkpoint.early_stopped(state, cfg.eval.early_stopping_patience) else total_steps  # (it stopped early)
    stream = batching.MicroBatchStream(n_items, mb, world, rank, cfg.data.seed, state["epoch"], state["pos"])

    metrics = Metrics(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), enabled=is_main,
                      resume_step=state["step"] if own else None)
    source_paths = [s["path"] for s in sources_of(cfg.data)]  # (their short names name the per-source metrics)
    if is_main:
        with open(os.path.join(run_dir, "data_stats.json"), "w") as f:
            json.dump(data_stats, f, indent=2)
        metrics.summary({"params/trainable": n_trainable, "params/total": n_total, **data_summary(data_stats, source_paths)})
        log.info("run dir %s | %d train / %d eval conversations | steps: %d | ranks: %d | trainable %.2f M of %.2f M params",
                 run_dir, len(train_ds), len(eval_ds) if eval_ds is not None else 0, total_steps, world,
                 n_trainable / 1e6, n_total / 1e6)

    ev = cfg.eval
    eval_texts = eval_conversations(data_path) if eval_ds is not None else []
    eval_sources = suite.source_names(source_paths)

    def suite_result(parts, base_ctx=None, base_rows=None):
        with attention.standard(engine.module), kernels.eager(kc.compile):
            return suite.run_suite(parts, model=engine.module, forward=engine, tokenizer=tokenizer, eot=eot, cfg=ev,
                                   eval_ds=eval_ds, sources=eval_sources, conversations=eval_texts, pad_id=pad_id,
                                   micro_batch_size=mb, max_len=cfg.data.max_seq_len, world=world, rank=rank, dev=dev,
                                   synced=cfg.deepspeed.stage == 3 and world > 1, intent_cfg=cfg.data.intent,
                                   base_ctx=base_ctx, base_rows=base_rows, progress=is_main and t.progress_bar)

    # a full fine-tune has no adapter to switch off for the base comparison: its base is measured
    # before the first step, kept in eval/base_lm.json for the jobs that resume this run
    full_base_rows = None
    if cfg.peft.method == "none" and ev.base_comparison and "lm" in ev.at_end and eval_ds is not None:
        eval_dir = os.path.join(run_dir, "eval")
        if state["step"] == 0:  # a fresh start measures (a file there is an earlier run's)
            if is_main:
                log.info("base comparison: the held-out loss of the base, before the first step")
            full_base_rows = [{**row, "model": "base"} for row in suite_result(["lm"]).get("lm", {}).get("rows", [])]
            if is_main:
                eval_results.write_base_rows(eval_dir, full_base_rows)
        elif (full_base_rows := eval_results.read_base_rows(src := eval_dir if own else os.path.join(
                os.path.dirname(found[0]), "eval"))) is None and is_main:  # (started from another run: its base)
            log.warning("no base comparison at the end: %s was not written before this run's first step (it started before "
                        "dialtune measured a full fine-tune's base, or without eval.base_comparison)",
                        os.path.join(src, eval_results.BASE_LM))
        elif not own and is_main:
            eval_results.write_base_rows(eval_dir, full_base_rows)

    written = {"step": None, "res": {}}

    def run_eval(parts, step, final):
        faults.fail_eval(parts)
        base = final and ev.base_comparison
        new = suite_result(parts, base_ctx=engine.module.disable_adapter if base and cfg.peft.method != "none" else None,
                           base_rows=full_base_rows if base else None)
        joined = written["step"] == step  # (parts run after the final save join the rest: only theirs are shown)
        res = {**written["res"], **new} if joined else new
        written.update(step=step, res=res)
        if is_main and res:
            eval_results.write(res, os.path.join(run_dir, "eval"), step, os.path.join(ckpt_root, checkpoint.tag_for(step)))
            metrics.table("eval/samples", res.get("samples", []), step)
            if text := eval_results.tables_text(new):
                log.info("eval at step %d%s:\n%s", step, " (continued)" if joined else "", text)
        return eval_results.scalars(res)

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True) if is_main and t.progress_bar else None

    # ---- loop ---------------------------------------------------------------------------------
    eval_result: Dict[str, float] = {}
    last_saved = state["step"] if found else -1
    first_step = state["step"] + 1
    preempted, stop_signal = False, None
    # (the run's counts, across jobs: a stop for non-finite steps in a row comes where an uninterrupted run's would)
    skipped, bad_in_row, nonfinite_stop, own_norm = state.get("skipped_steps", 0), state.get("bad_in_row", 0), 0, None
    inject_nan = faults.injected_nan_steps()
    corrupt = False
    save_args = (is_main, cfg.deepspeed.stage, tokenizer, t.keep_checkpoints, config_yaml,
                 cfg.export.checkpoint == "best" or ev.early_stopping_patience > 0)  # (the rotation keeps the best checkpoint)
    engine.train()
    stop_flag.armed = True  # from here a SIGTERM is answered with a checkpoint
    for step in range(first_step, last_step + 1):
        t0 = time.perf_counter()
        rng_before = checkpoint.rng_state() if t.nonfinite == "stop" else None  # (a failed step's last good state resumes with it)
        faults.signal_at(step)
        made = [make_batch(stream.next()) for _ in range(gas)]
        batches = [b for b, _ in made]
        local = [sum(batching.target_tokens(b) for b in batches),
                 sum(int((b["input_ids"] != pad_id).sum()) for b in batches),
                 sum(b["input_ids"].numel() for b in batches),
                 sum(flops.flops_for_documents(model_config, lengths) for _, lengths in made)]
        n_targets, n_real, n_padded, step_flops = distributed.all_sum(local, dev)
        lr = optimizer.param_groups[0]["lr"]
        scale = world / max(n_targets, 1.0)
        loss_sum, bad_step = 0.0, False
        for i, b in enumerate(batches):
            hooks = []
            if inject_nan and inject_nan[0] <= step <= inject_nan[1] and rank == inject_nan[2]:
                hooks.append(faults.nan_activations(engine))  # fault injection for tests
            ce, out = forward_ce(b)
            # every rank learns whether any rank's loss is non-finite: all take the same path
            (nonfinite,) = distributed.all_sum([0.0 if torch.isfinite(ce).item() else 1.0], dev)
            if nonfinite:
                bad_step = True
                if t.nonfinite == "stop":
                    for h in hooks:
                        h.remove()
                    break
                # contributes nothing: a zero loss on the same graph (every rank's backward and
                # DeepSpeed's gradient hooks run as on any step), and every trainable gradient
                # replaced by zeros on its way in, since 0 x NaN activations is still NaN
                ce = out.logits.float().nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
                hooks += [p.register_hook(torch.zeros_like) for p in trainable]
            engine.backward(ce * scale, scale_wrt_gas=False)
            for h in hooks:
                h.remove()
            if i == gas - 1:
                skip_update.on = bad_step
                if cfg.deepspeed.stage == 0:  # DeepSpeed reports no norm without ZeRO: grads are whole here
                    own_norm = torch.norm(torch.stack([p.grad.float().norm() for p in trainable if p.grad is not None])).item()
            engine.step()
            skip_update.on = False
            loss_sum += ce.item()
        if bad_step:
            bad_in_row += 1
            skipped += 1
            log.warning("non-finite loss at step %d (%d in a row)", step, bad_in_row)
            if t.nonfinite == "stop":  # the update never ran: the last good state is the step before
                nonfinite_stop = step
                break
            nonfinite_stop = step if bad_in_row > t.max_nonfinite_in_row else 0  # (skipped as any, saved, then the run stops)
        else:
            bad_in_row = 0
        loss_sum, got_usr1, got_term = distributed.all_sum([loss_sum, float(stop_flag.usr1), float(stop_flag.term)], dev)
        if got_usr1 or got_term:  # every rank sees the same sums, so all stop at this boundary
            stop_signal = "SIGUSR1" if got_usr1 else "SIGTERM"
        loss = loss_sum / max(n_targets, 1.0)
        grad_norm = engine.get_global_grad_norm() if cfg.deepspeed.stage else own_norm
        if not bad_step and grad_norm is not None and not math.isfinite(float(grad_norm)):
            # a finite loss with a non-finite gradient: the update may already be applied (DeepSpeed's
            # bf16 overflow check skips it in ZeRO-1/2), so under `stop` no new checkpoint is written
            skipped += 1
            bad_in_row += 1
            log.warning("non-finite gradient norm at step %d (%d in a row)", step, bad_in_row)
            if t.nonfinite == "stop" or bad_in_row > t.max_nonfinite_in_row:
                nonfinite_stop, corrupt = step, True
                break
        elapsed = time.perf_counter() - t0
        state.update(step=step, epoch=stream.epoch, pos=stream.pos, skipped_steps=skipped, bad_in_row=bad_in_row,
                     target_tokens_seen=state["target_tokens_seen"] + int(n_targets))

        record = {"train/loss": None if bad_step else loss, "train/skipped_steps": skipped, "train/lr": lr, "train/epoch": stream.epoch + stream.pos / max(1, len(stream._plan)),
                  # (a skipped step's is the norm of the zeroed gradients: left out, as its loss; a non-finite one is no JSON)
                  "train/grad_norm": float(grad_norm) if grad_norm is not None and not bad_step and math.isfinite(grad_norm) else None,
                  "perf/target_tokens": int(n_targets), "perf/tokens": int(n_real), "perf/padded_tokens": int(n_padded),
                  "perf/target_tok_s": n_targets / elapsed, "perf/tok_s": n_real / elapsed,
                  "perf/step_time_s": elapsed, **flops.step_metrics(step_flops, elapsed, world, peak), **memory_gb()}
        preempted, final = stop_signal is not None, step == total_steps
        parts, late = suite.parts_at(ev, step, t.save_every, cfg.export.checkpoint == "best", final, preempted)
        if parts:
            eval_result = run_eval(parts, step, final=final)
            if not final and checkpoint.note_patience(state, eval_result.get("eval/loss"), ev.early_stopping_patience,
                                                      ev.early_stopping_min_delta):
                last_step, late = step, [] if preempted else list(ev.at_end)  # early stopping: this step ends the run
            record.update(eval_result)
        stop_here = preempted or bool(t.stop_after_steps) and step - first_step + 1 >= t.stop_after_steps
        candidate = bool(t.save_every) and step % t.save_every == 0 or step == last_step  # (early stopping may set last_step)
        if candidate or stop_here:  # a stop's extra checkpoint is no candidate for the best: an uninterrupted run has none there
            checkpoint.note_eval(state, step, record.get("eval/loss") if candidate else None)
            checkpoint.save(engine, ckpt_root, step, dict(state), *save_args)
            last_saved = step
        try:
            if late:  # (joined with what this step measured before the save)
                record.update(eval_result := run_eval(late, step, final=True))
        finally:  # the step's row, also when an end-of-training part failed; an eval's results are always logged
            if step % t.log_every == 0 or parts or late or bad_step or stop_here or step == last_step:  # (a job's last too)
                metrics.log({k: v for k, v in record.items() if v is not None}, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **({"eval": f"{record['eval/loss']:.3f}"} if "eval/loss" in record else {}))
        if stop_here or step == last_step or nonfinite_stop:  # (early stopping sets last_step)
            break
    if bar is not None:
        bar.close()

    # ---- finish -------------------------------------------------------------------------------
    if last_saved != state["step"] and not corrupt:  # stopped by a failed step (`stop`: the state before it, its random state too)
        checkpoint.save(engine, ckpt_root, state["step"], dict(state), *save_args, rng=rng_before)
    final_ckpt = os.path.join(ckpt_root, checkpoint.tag_for(state["step"] if not corrupt else max(last_saved, 0)))
    best_ckpt = os.path.join(ckpt_root, checkpoint.best_tag(state)) if state.get("best") else None
    if cfg.export.checkpoint == "best" and best_ckpt is None and is_main:
        log.warning("export.checkpoint=best, but no checkpoint had a held-out loss measured at its step: exporting the last")
    summary = {"run_dir": run_dir, "base": base_path, "steps": state["step"], "total_steps": total_steps,
               "finished": state["step"] == last_step and not nonfinite_stop,
               "early_stopped_step": last_step if last_step < total_steps else None, "preempted": preempted, "stop_signal": stop_signal, "world_size": world,
               "nonfinite_stop_step": nonfinite_stop, "nonfinite_in_row": bad_in_row, "skipped_steps": skipped, "grad_accum": gas,
               "global_batch_size": mb * gas * world,
               "checkpoint": final_ckpt, "adapter": os.path.join(final_ckpt, "adapter") if cfg.peft.method != "none" else None,
               "best_checkpoint": best_ckpt, "best_eval_loss": state["best"]["eval_loss"] if best_ckpt else None,
               "export_checkpoint": (best_ckpt if cfg.export.checkpoint == "best" and best_ckpt else final_ckpt)
               if state["step"] == last_step else None,
               "metrics": metrics.path, "precision": mixed_precision(cfg), "quantized_linear_layers": ran["quantized"],
               "fast_int8_layers": ran["fast_int8"], "fused_lora_layers": ran["fused_lora"],
               "fused_lora_parts": sorted(fused_lora.fused_parts(model)) if ran["fused_lora"] else [], "fused_ce": not no_fused,
               "checkpointed_layers": ran["checkpointed"],
               "packed_attention": layout["path"] if packs is not None else None, "peak_tflops": peak / 1e12 if peak else None,
               "params_trainable": n_trainable, "params_total": n_total, "target_tokens_seen": state["target_tokens_seen"]}
    # the last step's eval only (an earlier one is in metrics); a job that trained nothing has what an earlier job
    # measured at that step (the held-out loss before the final save, when a generating part failed after it)
    eval_result = (eval_result if written["step"] == state["step"] else
                   metrics.evals_at(state["step"]) if first_step > state["step"] else {})
    summary.update(eval_result)
    metrics.summary(eval_result)
    wandb_dir = metrics.close()
    summary = checkpoint.write_summary(os.path.join(run_dir, "summary.json"), {**summary, "wandb_dir": wandb_dir},
                                       found and first_step > last_step, is_main)
    engine.destroy()
    distributed.barrier()
    return summary
