"""The eval suite: metrics on hand-made inputs with known answers, intent classification by
log-likelihood and by generation, stop tokens, response scoring, the files it writes, and the
suite inside a 2-process ZeRO-3 run plus `dialtune eval` / `dialtune report` on its output."""
import json
import os
import pytest
import torch

from data_pipeline.chat import DataError, end_of_turn_id, tokenize_conversation
from tests.conftest import ROOT, read_metrics, train
from tests.wandb_history import history
from train import eval_results
from train import evaluate as suite
from train.eval_metrics import classification_report, repeats, text_metrics

CPU = torch.device("cpu")
INTENTS = {
    "refund_request": ["I want my money back for order {}", "please refund order {}", "refund the {} charge",
                       "money back for the {} purchase", "I need a refund on {}", "refund {} now"],
    "lost_card": ["I lost my card at {}", "my card was stolen near {}", "card missing since {}",
                  "cannot find my card after {}", "lost card {} help", "someone took my card at {}"],
    "human_agent": ["let me talk to a person about {}", "human agent please {}", "transfer me to a human {}",
                    "I want a real person {}", "connect me to staff {}", "speak with an agent {}"],
}
SYSTEM = "Classify the customer's message into its intent. Answer with the intent label only."


def _conv(text, label=None):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return msgs + ([{"role": "assistant", "content": label}] if label else [])


def _examples(words):
    return [(_conv(t.format(w)), label) for label, ts in INTENTS.items() for t in ts for w in words]


@pytest.fixture(scope="module")
def intent_model(tokenizer):
    """A tiny Llama fully trained to answer each utterance with its intent label and stop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipeline import batching

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    eot = end_of_turn_id(tokenizer)
    rows = []
    for prompt, label in _examples(["A1", "B2", "C3"]):
        ids, labels = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": label}], eot)
        rows.append({"input_ids": ids, "labels": labels})
    batch = batching.collate(rows, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add synchronisation (and fight other jobs)
    for _ in range(60):
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != -100  # project only the target positions: the vocabulary matmul is most of the cost
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), targets[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05, loss.item()
    return model.eval(), eot


def test_classification_report_known_answers():
    r = classification_report(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", None], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["unknown"] == 1 and r["n"] == 5
    pa, pb, pc = r["per_class"]["a"], r["per_class"]["b"], r["per_class"]["c"]
    assert (pa["precision"], pa["recall"], pa["f1"], pa["support"]) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (pb["precision"], pb["recall"], pb["f1"], pb["support"]) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (pc["precision"], pc["recall"], pc["f1"]) == (0.0, 0.0, 0.0)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)


def test_text_metrics_and_loop_detection():
    same = text_metrics(["your refund is on its way", "the card is blocked"],
                              ["your refund is on its way", "the card is blocked"])
    assert same == pytest.approx({"chrf": 100.0, "bleu": 100.0, "rougeL": 100.0})
    other = text_metrics(["zzz qqq"], ["your refund is on its way"])
    assert other["bleu"] == 0.0 and other["rougeL"] == 0.0 and other["chrf"] < 10
    assert repeats([1, 2, 3, 4] * 3) and not repeats(list(range(20)))


def test_shards_cover_every_item_once_with_equal_counts():
    for n, world in [(5, 2), (4, 2), (1, 3), (0, 2)]:
        parts = [suite.shard(n, world, r) for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        assert sorted(i for p in parts for i in p if i >= 0) == list(range(n))


def test_intent_by_loglik_and_generation_on_a_trained_model(tokenizer, intent_model):
    model, eot = intent_model
    held_out = _examples(["Z9", "Y8"])  # unseen order numbers / places
    labels = sorted(INTENTS)
    r = suite.intent_eval(model, model, tokenizer, eot, held_out, labels, ["loglik", "generate"], 8, 1, 0, CPU, False)
    for mode in ("loglik", "generate"):
        assert r[mode]["accuracy"] == 1.0 and r[mode]["macro_f1"] == 1.0 and r[mode]["unknown"] == 0, (mode, r[mode])
        assert r[mode]["per_class"]["human_agent"]["support"] == 12


def test_loglik_picks_the_label_made_most_likely(tokenizer):
    """With the final norm zeroed every next-token distribution is uniform, so a label's
    log-likelihood is -(its tokens + end-of-turn) x log V: the label with fewest tokens must win,
    whatever the utterance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)).eval()
    torch.nn.init.zeros_(model.model.norm.weight)
    labels = ["transfer_to_human_agent_now", "refund", "card_was_lost_or_stolen"]
    lengths = {lab: len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels}
    shortest = min(labels, key=lengths.get)
    eot = end_of_turn_id(tokenizer)
    ex = [(_conv(f"message {i}"), shortest) for i in range(5)]
    r = suite.intent_eval(model, model, tokenizer, eot, ex, labels, ["loglik"], 4, 1, 0, CPU, False)
    assert r["loglik"]["accuracy"] == 1.0


def test_generation_stops_at_the_end_of_turn_token(tokenizer, intent_model):
    model, eot = intent_model
    prompt = suite.prompt_ids(tokenizer, _conv("please refund order Q7"), 0)
    (toks, stopped), = suite.generate(model, tokenizer, [prompt], CPU, 20, [eot, tokenizer.eos_token_id])
    assert stopped and eot not in toks
    assert tokenizer.decode(toks, skip_special_tokens=True).strip() == "refund_request"
    (toks, stopped), = suite.generate(model, tokenizer, [prompt], CPU, 1, [eot])
    assert not stopped and len(toks) == 1


def test_response_scores_samples_and_files(tokenizer, intent_model, tmp_path):
    from omegaconf import OmegaConf

    from train.config import EvalConfig

    model, eot = intent_model
    convs = [{"messages": p + [{"role": "assistant", "content": lab}]} for p, lab in _examples(["X1"])[:5]]
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"response_conversations": 4, "samples": 2,
                                                             "decoding": ["greedy", "sampled"], "temperature": 0.5})
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    res = suite.run_suite(["response"], model=model, forward=model, tokenizer=tokenizer, eot=eot, cfg=cfg, eval_ds=None,
                          sources=[], conversations=convs, pad_id=tokenizer.pad_token_id, micro_batch_size=2, max_len=256,
                          world=1, rank=0, dev=CPU)
    assert torch.equal(torch.get_rng_state(), rng)  # inside training, dropout's RNG stream is left alone
    one = suite.run_suite(["response"], model=model, forward=model, tokenizer=tokenizer, eot=eot, eval_ds=None, sources=[],
                          cfg=OmegaConf.merge(cfg, {"batch_size": 1}), conversations=convs, pad_id=tokenizer.pad_token_id,
                          micro_batch_size=2, max_len=256, world=1, rank=0, dev=CPU)
    assert one["response"] == res["response"] and one["samples"] == res["samples"]  # eval.batch_size changes nothing
    greedy = res["response"]["greedy"]
    assert greedy["n"] == 4 and greedy["chrf"] == pytest.approx(100.0) and greedy["stopped_share"] == 1.0
    assert greedy["repetition_share"] == 0.0
    assert {s["decoding"] for s in res["samples"]} == {"greedy", "sampled"} and len(res["samples"]) == 4
    # the eval's decoding is its own, whatever the base model's generation_config.json holds
    model.generation_config.repetition_penalty, model.generation_config.top_k = 50.0, 1
    res2 = suite.run_suite(["response"], model=model, forward=model, tokenizer=tokenizer, eot=eot, cfg=cfg, eval_ds=None,
                           sources=[], conversations=convs, pad_id=tokenizer.pad_token_id, micro_batch_size=2, max_len=256,
                           world=1, rank=0, dev=CPU)
    assert res2["samples"] == res["samples"] and model.generation_config.repetition_penalty == 50.0
    model.generation_config.repetition_penalty, model.generation_config.top_k = 1.0, None
    paths = eval_results.write(res, str(tmp_path), 7, "ckpt")
    body = json.loads(open(paths["results"]).read())
    assert body["step"] == 7 and "greedy" in body["response"] and "samples" not in body
    rows = [json.loads(line) for line in open(paths["samples"])]
    assert rows[0]["reference"] == "refund_request" and rows[0]["generation"] == "refund_request"
    assert "**Generation**" in open(paths["samples_md"]).read()
    assert eval_results.scalars(res)["eval/response/greedy/chrf"] == pytest.approx(100.0)
    md = open(paths["samples_md"]).read()
    assert "```text\nrefund_request\n```" in md
    eval_results.write({"lm": {"rows": []}}, str(tmp_path), 8, "ckpt")  # no samples this time: none of the old ones stay
    assert not (tmp_path / "samples.jsonl").exists() and not (tmp_path / "samples.md").exists()
    # `dialtune eval` into a run's eval/ keeps what it replaces (the end of training's results)
    os.utime(paths["results"], (0, 86400 * 500))  # mid-May 1971 in any time zone
    kept = eval_results.keep_earlier(str(tmp_path))
    assert os.path.basename(kept).startswith("earlier-1971") and json.loads(open(os.path.join(kept, "results.json")).read())["step"] == 8
    assert not (tmp_path / "results.json").exists() and eval_results.keep_earlier(str(tmp_path)) is None


def test_a_sampled_answer_is_the_same_in_any_batch_and_a_true_draw(tokenizer):
    """Each conversation samples from its own stream (seeded by its place in the list), so the sampled
    scores do not change with eval.batch_size or the number of ranks; the Gumbel-max draw it uses
    has the softmax's frequencies (temperature and top-p applied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.generation import RowSampler

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)).eval()
    prompts = [suite.prompt_ids(tokenizer, _conv(f"refund order {w}"), 0) for w in ("A", "BB 7", "C", "D D", "E")]
    gen = lambda ps, seeds: suite.generate(model, tokenizer, ps, CPU, 6, [], sample=True, seeds=seeds)  # noqa: E731
    whole = gen(prompts, range(10, 15))
    assert gen(prompts[:2], [10, 11]) + gen(prompts[2:], [12, 13, 14]) == whole == gen(prompts[::-1], range(14, 9, -1))[::-1]
    assert gen(prompts, range(20, 25)) != whole
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)]:
        picks = RowSampler(range(20000), CPU, temperature, top_p)(None, logits).argmax(-1)
        want = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1.0:  # the nucleus: the most likely tokens whose mass reaches top_p
            want = torch.where(torch.arange(5) < 2, want, 0.0) / want[:2].sum()
        assert torch.allclose(torch.bincount(picks, minlength=5) / 20000, want, atol=0.012), (temperature, top_p)


def test_which_parts_a_training_step_runs():
    from types import SimpleNamespace as NS
    ev = NS(every_n_steps=2, during_training=["lm", "intent"], at_end=["lm", "intent", "response"], early_stopping_patience=0)
    at = lambda step, final=False, preempted=False, best=False, save_every=4: suite.parts_at(  # noqa: E731
        ev, step, save_every, best, final, preempted)
    assert at(1) == ([], []) and at(2) == (["lm", "intent"], [])
    assert at(8, final=True) == (["lm"], ["intent", "response"])  # generation after the last save
    assert at(8, final=True, preempted=True) == (["lm"], [])  # signalled: no time for generation
    assert at(2, preempted=True) == ([], [])  # nothing rests on this eval
    assert at(2, preempted=True, best=True) == ([], []) and at(4, preempted=True, best=True) == (["lm"], [])
    ev.early_stopping_patience = 2
    assert at(2, preempted=True) == (["lm"], [])  # the patience count rests on it
    ev.every_n_steps = 0
    assert at(2) == ([], []) and at(4, preempted=True) == ([], [])


def test_source_names_never_take_the_overall_rows_name():
    assert suite.source_names(["d/all.jsonl", "e/b.jsonl", "f/b.jsonl.gz"]) == ["all_0", "b", "b_2"]


def test_intent_examples_outside_the_label_set_are_left_out(tmp_path):
    from train.config import IntentConfig

    f = tmp_path / "i.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{k}", "label": lab}) + "\n" for k, lab in enumerate("abcab")))
    ex, labels = suite.load_intents([str(f)], IntentConfig(), 0, ["a", "b"])
    assert [g for _, g in ex] == ["a", "b", "a", "b"] and labels == ["a", "b"]
    ex, _ = suite.load_intents([str(f)], IntentConfig(), 3, ["a", "b"])
    assert len(ex) == 3
    with pytest.raises(DataError, match="no utterance labelled with one of eval.intent_labels"):
        suite.load_intents([str(f)], IntentConfig(), 0, ["z"])


def test_intent_examples_above_the_cap_are_a_fixed_sample_across_labels_and_empty_labels_are_refused(tmp_path):
    """A file sorted by label (BANKING77's): the first 200 of 10,000 would be one or two labels."""
    from train.config import IntentConfig

    f = tmp_path / "sorted.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{k}", "label": f"l{k // 100}"}) + "\n" for k in range(10_000)))
    ex, labels = suite.load_intents([str(f)], IntentConfig(), 200)
    assert len(ex) == 200 and len(labels) == 100 and len({g for _, g in ex}) > 70
    assert ex == suite.load_intents([str(f)], IntentConfig(), 200)[0]  # the same sample every time (and rank)
    assert [int(m[-1]["content"][1:]) for m, _ in ex] == sorted(int(m[-1]["content"][1:]) for m, _ in ex)  # file order
    for bad, said in (({"text": "hi", "label": " "}, "the label is empty"), ({"text": "", "label": "a"}, "the text is empty")):
        f.write_text(json.dumps({"text": "hello", "label": "a"}) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"sorted.jsonl:2: {said}"):
            suite.load_intents([str(f)], IntentConfig(), 0)


@pytest.mark.slow
def test_suite_inside_two_rank_zero3_training_then_eval_and_report_cli(tmp_path, capsys):
    """All three parts every step under ZeRO-3 with every parameter partitioned (generation with
    synced ranks, an odd number of examples so one rank pads), W&B samples table, then
    `dialtune eval` on the run and on its merged checkpoint, and `dialtune report`."""
    intents = ROOT / "data_pipeline" / "sample_data" / "intents.jsonl"
    train(["recipe=demo", "train.max_steps=2", "deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=0",
           "eval.every_n_steps=1", "eval.during_training=[intent,response]", "eval.at_end=[lm,intent,response]",
           "train.log_every=5", f"eval.intent_files=[{intents}]",
           "eval.intent_max_examples=5", "eval.intent_labels=[card_arrival,cash_withdrawal_charge,lost_or_stolen_card]",
           "eval.response_conversations=3", "eval.decoding=[greedy,sampled]", "eval.max_new_tokens=6",
           "eval.samples=2", "export.eval_conversations=4", "logger=wandb"],
          tmp_path, nproc=2, via="torchrun")
    run_dir = tmp_path / "demo"
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    for step in (1, 2):  # logged although no log_every step and (step 1) no lm part
        assert "eval/intent/loglik/accuracy" in rows[step] and "eval/response/sampled/chrf" in rows[step]
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    assert res["step"] == 2 and res["intent"]["loglik"]["n"] == 5 and res["intent"]["generate"]["n"] == 5
    assert {r["model"] for r in res["lm"]["rows"]} == {"fine-tuned", "base"}
    assert res["response"]["greedy"]["n"] == 3
    assert rows[2]["eval/loss"] == pytest.approx(next(r["loss"] for r in res["lm"]["rows"]
                                                      if r["model"] == "fine-tuned" and r["source"] == "all"))
    assert len((run_dir / "eval" / "samples.jsonl").read_text().splitlines()) == 4
    tables = [r for r in history(run_dir / "wandb") if r.get("eval/samples/_type") == "table-file"]
    assert [r["_step"] for r in tables] == [1, 2] and tables[-1]["eval/samples/nrows"] == 4
    table = json.loads(next((run_dir / "wandb").glob(f"offline-run-*/files/{tables[-1]['eval/samples/path']}")).read_text())
    assert "generation" in table["columns"] and len(table["data"]) == 4

    from launch.cli import main as cli  # in-process: the same code path as the console script

    out = tmp_path / "cli_eval"
    # (a training file that is gone since: the held-out files alone are read)
    assert cli(["eval", str(run_dir), "--parts", "lm,intent", "--out", str(out), "eval.intent_modes=[loglik]",
                "eval.intent_max_examples=3", f"data.train_files=[{tmp_path / 'moved.jsonl'}]"]) == 0
    again = json.loads((out / "results.json").read_text())
    err = capsys.readouterr().err
    assert "over the run's 2 ranks: reading the same first 4 micro-batches" in err
    assert "not held out from your data" not in err  # (the run trained on the bundled sample: its held-out file is right)
    # the same adapter, data and loss as the end of training (fp32 here as there), from the same
    # micro-batches: eval.lm_max_batches=2 (tests/conftest.py) per rank of the 2 that trained
    assert [r["loss"] for r in again["lm"]["rows"]] == pytest.approx([r["loss"] for r in res["lm"]["rows"]], rel=1e-4)
    assert [(r["model"], r["source"]) for r in again["lm"]["rows"]] == [(r["model"], r["source"]) for r in res["lm"]["rows"]]
    # nothing held out (no files, no fraction): lm has nothing to read and says so; intent still runs
    assert cli(["eval", str(run_dir), "--parts", "lm,intent", "--out", str(tmp_path / "no_held_out"), "data.eval_files=[]",
                "eval.intent_modes=[loglik]", "eval.intent_max_examples=3"]) == 0
    assert "lm" not in json.loads((tmp_path / "no_held_out" / "results.json").read_text()) and "intent" in json.loads(
        (tmp_path / "no_held_out" / "results.json").read_text())
    assert cli(["eval", str(run_dir / "merged"), "--parts", "lm", "--out", str(tmp_path / "merged_eval")]) == 0
    merged_res = json.loads((tmp_path / "merged_eval" / "results.json").read_text())
    merged = merged_res["lm"]["rows"]
    assert merged_res["step"] == 2  # the checkpoint export_summary.json names
    assert merged[0]["loss"] == pytest.approx(res["lm"]["rows"][0]["loss"], rel=1e-4)
    assert cli(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["eval", str(run_dir), "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device name" in capsys.readouterr().err
    assert cli(["eval", str(run_dir), "--parts", "response,intent", "eval.response_conversations=0", "eval.intent_files=[]"]) == 2
    assert ("nothing to evaluate (response: eval.response_conversations=0; intent: no eval.intent_files)"
            in capsys.readouterr().err)
    assert cli(["eval", str(run_dir), "--parts", "lm", "logger=none"]) == 2  # (was "? has an invalid value (Merge error ...")
    assert "dialtune: error: logger=none chooses a config group, which only training composes" in capsys.readouterr().err
    assert again["step"] == 2  # from the checkpoint's trainer_state.json

    assert cli(["report", str(run_dir)]) == 0
    for name in ("loss.png", "lr.png", "throughput.png", "memory.png"):
        data = (run_dir / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    md = (run_dir / "report" / "report.md").read_text()
    assert "lost_or_stolen_card" in md and "chrf" in md.lower()


def test_scalars_name_sources_only_when_there_are_several():
    def row(model, source, loss):
        return {"model": model, "source": source, "loss": loss, "ppl": 1.0, "target_tokens": 10}

    one = eval_results.scalars({"lm": {"rows": [row("fine-tuned", "all", 1.0), row("fine-tuned", "a", 1.0)]}})
    assert one == {"eval/loss": 1.0, "eval/ppl": 1.0, "eval/target_tokens": 10}
    two = eval_results.scalars({"lm": {"rows": [row("fine-tuned", "all", 1.5), row("fine-tuned", "a", 1.0), row("fine-tuned", "b", 2.0),
                                         row("base", "all", 3.0), row("base", "a", 2.5), row("base", "b", 3.5)]}})
    assert two["eval/loss/a"] == 1.0 and two["eval/loss/b"] == 2.0 and two["eval_base/loss/b"] == 3.5


def test_eval_names_the_config_line_it_cannot_read(tmp_path, capsys):
    """A run directory whose config.yaml has a key this version dropped (or an override with a
    bad key or value): one sentence naming the file and key, exit code 2, no traceback."""
    from launch.cli import main as cli

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_0000002" / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("export:\n  verify_tolerance_dequantized: 0.05\n")
    assert cli(["eval", str(run_dir / "checkpoints" / "step_0000002")]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.yaml'}: key export.verify_tolerance_dequantized is not known" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert cli(["eval", str(merged)]) == 2
    assert "the merged checkpoint=" in capsys.readouterr().err  # no weights: named, not a traceback
    (run_dir / "config.yaml").write_text("optim:\n  lr: 0.001\n")
    assert cli(["eval", str(run_dir / "checkpoints" / "step_0000002"), "optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "override optim.lr=fast: optim.lr has an invalid value" in err and "Traceback" not in err


def test_long_prompts_lose_whole_old_turns_not_their_start(tokenizer):
    """A response prompt longer than the budget drops its oldest turns whole (system message kept,
    still opening with a user turn), as training's keep_recent does, instead of starting in the
    middle of a sentence."""
    msgs = [{"role": "system", "content": "You are the bank's assistant."}]
    for k in range(6):
        msgs += [{"role": "user", "content": f"question {k} " + "about my card " * 8},
                 {"role": "assistant", "content": f"answer {k} " + "we can help " * 8}]
    msgs.append({"role": "user", "content": "and the last question"})
    full = suite.prompt_ids(tokenizer, msgs, 0)
    budget = len(full) // 2
    ids = suite.prompt_ids(tokenizer, msgs, budget)
    assert len(ids) <= budget
    assert ids[:3] == full[:3]  # the template's opening and the system message, not a fragment
    text = tokenizer.decode(ids)
    assert "You are the bank's assistant." in text and "and the last question" in text and "question 0" not in text
    first_turn = text.split("You are the bank's assistant.", 1)[1]
    assert first_turn.index("question") < first_turn.index("answer")  # opens with a user turn
    # a single user turn too long for the budget loses the start of its text, not the template's opening
    cut = suite.prompt_ids(tokenizer, msgs[:1] + [{"role": "user", "content": "word " * 400}], 64)
    assert len(cut) <= 64 and cut[:3] == full[:3]
