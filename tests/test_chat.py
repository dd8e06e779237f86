"""`dialtune chat` on CPU, against the merged lora checkpoint of conftest's peft_runs: --prompt
mode, one sentence for a bad checkpoint, generation stops at the end-of-turn token, the
interactive loop streams and keeps (and /reset clears) the history, Ctrl-C stops an answer and a
second Ctrl-C leaves with exit code 130."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_env

pytestmark = pytest.mark.slow


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.cli", "chat", *map(str, args)], env=run_env(), capture_output=True,
                          text=True, cwd=str(ROOT), timeout=timeout)


def test_chat_prompt_mode(peft_runs):
    proc = _cli(peft_runs["lora"] / "merged", "--prompt", "Where is my order?", "--max-new-tokens", "20",
                "--system", "You are the support agent of Acme.")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("what", ["missing", "no_merged", "not_a_checkpoint", "training_checkpoint"])
def test_chat_bad_checkpoint_is_one_sentence(peft_runs, tmp_path, what):
    ckpt = sorted((peft_runs["lora"] / "checkpoints").glob("step_*"))[0]
    path = {"missing": tmp_path / "nope", "no_merged": tmp_path, "not_a_checkpoint": tmp_path, "training_checkpoint": ckpt}[what]
    if what == "no_merged":
        (tmp_path / "config.yaml").write_text("model: {}\n")
    proc = _cli(path, "--prompt", "hi", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert len(errors) == 1, proc.stderr
    if what == "training_checkpoint":  # the merge it suggests is one that works (tests/test_export.py)
        assert f"is a training checkpoint (adapter and optimizer state), not a merged model; write one with `dialtune merge {ckpt} --out" in errors[0]


def test_generation_stops_at_end_of_turn(peft_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

    from launch.chat import answer, encode, generation_kwargs

    merged_dir = peft_runs["lora"] / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(merged_dir)
    assert eot in gen.eos_token_id and tok.eos_token_id in gen.eos_token_id
    messages = [{"role": "user", "content": "Where is my order?"}]
    inputs = encode(tok, messages, torch.device("cpu"))
    n = inputs["input_ids"].shape[1]
    assert tok.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")  # add_generation_prompt

    # as the chat command generates: ends with the end-of-turn id, or ran to max_new_tokens
    with torch.no_grad():
        out = model.generate(**inputs, **generation_kwargs(model, tok, 20, 0.0))[0, n:].tolist()
    assert (out[-1] in gen.eos_token_id) or len(out) == 20
    assert not any(t in gen.eos_token_id for t in out[:-1])

    class ForceEot(LogitsProcessor):
        """Make the 6th new token <|im_end|>, and no other a stop token: generation must stop right there."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == n + 5:
                scores[:] = -float("inf")
                scores[:, eot] = 0.0
            else:  # (a two-step model may well say a stop token first)
                scores[:, list(gen.eos_token_id)] = -float("inf")
            return scores

    forced = LogitsProcessorList([ForceEot()])
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=forced, **generation_kwargs(model, tok, 20, 0.0))[0, n:].tolist()
    assert len(out) == 6 and out[-1] == eot
    # the control: without the end-of-turn token among the eos ids, the same run goes on to 20
    kwargs = generation_kwargs(model, tok, 20, 0.0)
    kwargs["generation_config"].eos_token_id = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=forced, **kwargs)[0, n:].tolist()
    assert len(out) == 20 and out[5] == eot
    assert isinstance(answer(model, tok, messages, torch.device("cpu"), max_new_tokens=5), str)


def test_chat_interactive_streams_and_keeps_history(peft_runs, monkeypatch, capsys):
    import io
    from argparse import Namespace

    from launch import chat

    model, tok, dev = chat.load(str(peft_runs["lora"]))  # a run directory: its merged/
    seen = []
    real_encode = chat.encode
    monkeypatch.setattr(chat, "encode", lambda t, messages, d: seen.append([m["content"] for m in messages]) or real_encode(t, messages, d))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where is my order?\nIt is 42.\n/reset\nThanks\n"))
    args = Namespace(system="Be brief.", max_new_tokens=4, temperature=0.0, top_p=1.0)
    assert chat.interactive(model, tok, dev, args) == 0
    out = capsys.readouterr()
    assert len([line for line in out.out.splitlines() if line.strip()]) == 3  # three streamed answers
    assert "conversation cleared" in out.err
    first, second, third = seen
    assert first == ["Be brief.", "Where is my order?"]
    assert second[:2] == first and len(second) == 4 and second[3] == "It is 42."  # the history, with the answer
    assert third == ["Be brief.", "Thanks"]  # after /reset


def test_chat_ctrl_c_stops_the_answer_and_a_second_one_leaves_quietly(peft_runs, monkeypatch, capsys):
    """Ctrl-C while an answer streams stops that answer (the chat goes on); a second Ctrl-C while
    generation winds down leaves with exit code 130, not a traceback. The Ctrl-Cs arrive as
    KeyboardInterrupt in the main thread's loop over the streamer, as SIGINT delivers them."""
    from argparse import Namespace

    import transformers

    from launch import chat

    model, tok, dev = chat.load(str(peft_runs["lora"]))
    args = Namespace(system=None, max_new_tokens=64, temperature=0.0, top_p=1.0)
    messages = [{"role": "user", "content": "Where is my order?"}]
    presses = []

    class CtrlC(transformers.TextIteratorStreamer):
        def __next__(self):
            if len(presses) < want:
                presses.append(1)
                raise KeyboardInterrupt
            return super().__next__()

    monkeypatch.setattr(transformers, "TextIteratorStreamer", CtrlC)
    want = 1
    assert isinstance(chat._stream_answer(model, tok, messages, dev, args), str)
    assert "[stopped]" in capsys.readouterr().out
    presses.clear()
    want = 2
    with pytest.raises(SystemExit) as e:
        chat._stream_answer(model, tok, messages, dev, args)
    assert e.value.code == 130 and "[stopped]" in capsys.readouterr().out


def _run_with_sources(tmp_path, data_yaml, merged_from=None):
    """A run directory with config.yaml's data section and a merged/ checkpoint (a copy of
    merged_from, or an empty config.json: enough for resolve_checkpoint)."""
    import shutil

    run = tmp_path / "run"
    if merged_from is not None:
        shutil.copytree(merged_from, run / "merged")
        summary = run / "merged" / "export_summary.json"  # it names the run it came from: this one now
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "run_dir": str(run)}))
    else:
        (run / "merged").mkdir(parents=True)
        (run / "merged" / "config.json").write_text("{}")
    (run / "config.yaml").write_text(data_yaml)
    return run


ACME = "You are the support agent of Acme."


@pytest.mark.parametrize("data, expected, note", [
    (f"data:\n  sources:\n  - {{path: a.jsonl, system_prompt: '{ACME}'}}\n  - {{path: b.jsonl, system_prompt: '{ACME}'}}\n"
     f"  - {{path: c.jsonl, split: eval}}\n", ACME, "data.sources[0].system_prompt"),
    (f"data:\n  sources:\n  - {{path: a.jsonl, system_prompt: '{ACME}'}}\n  - {{path: b.jsonl, system_prompt: Be brief.}}\n",
     None, "set 2 system prompt(s) (data.sources[0].system_prompt, data.sources[1].system_prompt); none is used"),
    (f"data:\n  train_files: [x.jsonl]\n  sources:\n  - {{path: a.jsonl, system_prompt: '{ACME}'}}\n",
     None, "and 1 set none; none is used: pick one with --system"),
    ("data:\n  train_files: [x.jsonl]\n  sources: []\n", None, ""),
], ids=["one", "two", "some_without", "none"])
def test_run_system_prompt_is_the_default_only_when_every_training_source_sets_it(tmp_path, data, expected, note):
    from launch.chat import run_system_prompt

    run = _run_with_sources(tmp_path, data)
    for path in (run, run / "merged"):
        prompt, said = run_system_prompt(str(path))
        assert prompt == expected and note in said
    # merged with --out elsewhere: the run is the one export_summary.json names
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "export_summary.json").write_text(json.dumps({"run_dir": str(run)}))
    assert run_system_prompt(str(out))[0] == expected
    (out / "export_summary.json").unlink()
    assert run_system_prompt(str(out)) == (None, "")
    # merged with --out into another run's directory: the run it came from still decides
    other = tmp_path / "other"
    (other / "merged").mkdir(parents=True)
    (other / "config.yaml").write_text("data:\n  sources:\n  - {path: z.jsonl, system_prompt: Another run.}\n")
    (other / "merged" / "config.json").write_text("{}")
    (other / "merged" / "export_summary.json").write_text(json.dumps({"run_dir": str(run)}))
    assert run_system_prompt(str(other / "merged"))[0] == expected


def test_chat_uses_the_runs_system_prompt_unless_told_otherwise(peft_runs, tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    from launch import chat

    run = _run_with_sources(tmp_path, f"data:\n  sources:\n  - {{path: a.jsonl, system_prompt: '{ACME}'}}\n",
                            merged_from=peft_runs["lora"] / "merged")
    seen = []
    real_encode = chat.encode
    monkeypatch.setattr(chat, "encode", lambda t, messages, d: seen.append([m["content"] for m in messages]) or real_encode(t, messages, d))
    for system, first in ((None, [ACME, "hi"]), ("", ["hi"]), ("Be brief.", ["Be brief.", "hi"])):
        seen.clear()
        args = Namespace(checkpoint=str(run), device="cpu", prompt="hi", system=system, max_new_tokens=2, temperature=0.0, top_p=1.0)
        assert chat.cmd_chat(args) == 0
        assert seen[0] == first
        err = capsys.readouterr().err
        assert ("using the run's system prompt (data.sources[0].system_prompt" in err) == (system is None)


@pytest.mark.parametrize("option,value,message", [("--top-p", "0", "--top-p=0.0 must be in (0, 1]."),
                                                  ("--top-p", "5", "--top-p=5.0 must be in (0, 1]."),
                                                  ("--temperature", "-1", "--temperature=-1.0 must be 0 (greedy) or a positive finite number."),
                                                  ("--prompt", " ", "--prompt is empty: give the user's message (or leave "
                                                                    "--prompt out to chat interactively).")])
def test_chat_sampling_options_out_of_range_are_one_sentence(tmp_path, capsys, option, value, message):
    from launch.cli import main as cli

    assert cli(["chat", str(tmp_path), "--temperature", "0.7", option, value]) == 2  # (top-p is read when sampling)
    assert capsys.readouterr().err.strip() == f"dialtune: error: {message}"
