"""Chat and the response eval against the model's context and the chat template: chat lowers
--max-new-tokens to the room the context leaves, drops the oldest turns with a note and refuses a
message that alone leaves no room (the interactive chat goes on); it stops at the end-of-turn token
that generation_config.json does not list; it says when a run's merged/ is behind its latest
checkpoint; --temperature must be finite. Eval prompts are shortened inside the user's text, never
inside the template; a budget with no room is one sentence; the scored conversations are a fixed
sample of the whole eval set. Tiny random models built here (a 64-position GPT-2)."""
import io
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from launch import chat
from launch.cli import main as cli
from tests.conftest import TOKENIZER_DIR
from train import evaluate as suite
from train.config import ConfigError, EvalConfig
from train.generation import PromptTooLong, prompt_ids, render_prompt

CPU = torch.device("cpu")
SYSTEM = "You are the support agent of Acme."


def _save_tiny(out, tokenizer, positions=64):
    """A 1-layer GPT-2 with `positions` positions and the tiny tokenizer, saved as a merged
    checkpoint whose generation_config.json lists only the tokenizer's EOS (not <|im_end|>)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    return _save_tiny(tmp_path_factory.mktemp("gpt2") / "merged", AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))


def test_chat_lowers_max_new_tokens_to_the_room_the_context_leaves(tiny_dir, capsys):
    assert cli(["chat", str(tiny_dir), "--prompt", "short question", "--max-new-tokens", "100", "--system", ""]) == 0
    err = capsys.readouterr().err
    assert "this answer stops at" in err and "not --max-new-tokens 100" in err and "context of 64 tokens" in err
    assert "Traceback" not in err


def test_chat_refuses_a_message_that_alone_leaves_no_room(tiny_dir, capsys):
    assert cli(["chat", str(tiny_dir), "--prompt", "word " * 80, "--system", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dialtune: error: this message takes ") and err.count("\n") == 0
    assert "model's context of 64 tokens (max_position_embeddings" in err and err.endswith("send a shorter one.")


def test_interactive_chat_drops_old_turns_with_a_note_and_goes_on_after_a_refused_message(tiny_dir, monkeypatch, capsys):
    from argparse import Namespace

    model, tok, dev = chat.load(str(tiny_dir), "cpu")
    seen = []
    real_encode = chat.encode
    monkeypatch.setattr(chat, "encode", lambda t, messages, d: seen.append([m["content"] for m in messages]) or real_encode(t, messages, d))
    lines = ["first question about my card", "second question about my order", "word " * 80, "third"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    args = Namespace(system="Be brief.", max_new_tokens=12, temperature=0.0, top_p=1.0)
    assert chat.interactive(model, tok, dev, args) == 0
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if "this message takes" in line]
    assert len(refused) == 1 and refused[0].startswith("dialtune chat: this message takes")
    assert "Traceback" not in err
    # the long message was not sent, and the conversation before it was kept (then made to fit, with a note)
    last = seen[-1]
    assert last[0] == "Be brief." and last[-1] == "third" and lines[2] not in last
    asked = [s for s in seen if s[-1] == "third"]
    assert any(lines[1] in s for s in asked)  # the history was there when "third" was sent
    assert "left out the 2 oldest turn(s) of the conversation to fit the model's context of 64 tokens" in err
    assert lines[0] not in last


def test_chat_stops_at_the_end_of_turn_token_generation_config_does_not_list(tiny_dir):
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    model, tok, dev = chat.load(str(tiny_dir), "cpu")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(tiny_dir).eos_token_id == tok.eos_token_id != eot  # the control
    kwargs = chat.generation_kwargs(model, tok, 20, 0.0)
    assert eot in kwargs["generation_config"].eos_token_id
    inputs = chat.encode(tok, [{"role": "user", "content": "hi"}], dev)
    n = inputs["input_ids"].shape[1]

    class ForceEot(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == n + 3:  # the 4th new token is <|im_end|>; no stop token before it
                scores[:] = -float("inf")
                scores[:, eot] = 0.0
            else:
                scores[:, [eot, tok.eos_token_id]] = -float("inf")
            return scores

    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([ForceEot()]), **kwargs)[0, n:].tolist()
    assert len(out) == 4 and out[-1] == eot


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_chat_refuses_a_temperature_that_is_not_finite(tmp_path, capsys, value):
    assert cli(["chat", str(tmp_path), "--temperature", value]) == 2
    assert capsys.readouterr().err.strip() == f"dialtune: error: --temperature={float(value)} must be 0 (greedy) or a positive finite number."


def test_chat_says_when_the_runs_merged_checkpoint_is_behind_its_latest(tiny_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "merged")
    (run / "config.yaml").write_text("data: {}\n")
    (run / "checkpoints").mkdir()
    (run / "merged" / "export_summary.json").write_text(json.dumps({"checkpoint": str(run / "checkpoints" / "step_0000002"),
                                                                    "run_dir": str(run)}))

    def note(latest, summary=None):
        (run / "checkpoints" / "latest").write_text(latest)
        if summary is not None:
            (run / "summary.json").write_text(json.dumps(summary))
        assert cli(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--system", ""]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "note:" in line]

    said = note("step_0000004")  # resumed with export.merge_at_end=false, or the end merge failed
    assert said == [f"dialtune chat: note: {run / 'merged'} holds step_0000002 (its export_summary.json), not the run's "
                    f"latest checkpoint step_0000004; `dialtune merge {run}` merges the latest"]
    assert note("step_0000002") == []
    ckpt = str(run / "checkpoints")
    assert note("step_0000004", {"checkpoint": f"{ckpt}/step_0000004", "export_checkpoint": f"{ckpt}/step_0000002"}) == []  # best
    assert len(note("step_0000006")) == 1  # summary.json of an earlier job: behind again


def test_a_long_last_user_turn_is_shortened_inside_its_text_not_the_template(tokenizer):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "word " * 300 + "the real question"}]
    empty = render_prompt(tokenizer, msgs[:1] + [{"role": "user", "content": ""}])
    head = tokenizer(tokenizer.apply_chat_template(msgs[:1], tokenize=False), add_special_tokens=False)["input_ids"]
    for budget in (64, 40, len(empty) + 1):
        ids = prompt_ids(tokenizer, msgs, budget)
        assert len(ids) <= budget
        assert ids[:len(head)] == head and ids[0] == tokenizer.bos_token_id  # BOS and the system message whole
        assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(prompt_ids(tokenizer, msgs, 64)).count("<|im_start|>user\n") == 1
    assert "the real question<|im_end|>" in tokenizer.decode(prompt_ids(tokenizer, msgs, 64))  # its end is kept
    assert prompt_ids(tokenizer, msgs, len(empty)) == empty
    with pytest.raises(PromptTooLong) as e:
        prompt_ids(tokenizer, msgs, len(empty) - 1)
    assert e.value.need == len(empty)
    assert prompt_ids(tokenizer, msgs, 0) == render_prompt(tokenizer, msgs)  # no limit: whole


def _eval(tokenizer, convs, max_len, **cfg):
    from tests.model_helpers import tiny_llama

    model = tiny_llama(vocab=len(tokenizer)).eval()
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"decoding": ["greedy"], "max_new_tokens": 2, **cfg})
    return suite.response_eval(model, tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"), convs, cfg, max_len,
                               1, 0, CPU, False)


def _conv(user, answer, system=SYSTEM):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def test_response_eval_budget_without_room_is_one_sentence(tokenizer):
    convs = [_conv("where is my order", "on its way")]
    with pytest.raises(ConfigError, match=r"^eval.max_new_tokens=64 leaves no room for a response prompt in "
                                          r"data.max_seq_len=64; lower eval.max_new_tokens or raise data.max_seq_len"):
        _eval(tokenizer, convs, 64, max_new_tokens=64)
    with pytest.raises(ConfigError, match=r"^eval.max_new_tokens=60 leaves 4 of data.max_seq_len=64 tokens for a response "
                                          r"prompt, fewer than the \d+ a held-out conversation's chat template"):
        _eval(tokenizer, convs, 64, max_new_tokens=60)
    metrics, _ = _eval(tokenizer, convs, 64, max_new_tokens=8)
    assert metrics["greedy"]["n"] == 1


def test_response_eval_scores_a_sample_of_the_whole_eval_set_not_its_first_conversations(tokenizer):
    """The eval set is sorted by source: the first conversations would all be the first source's."""
    convs = [_conv(f"question {k}", f"{src} answer {k}") for src in ("alpha", "beta", "gamma") for k in range(10)]
    _, samples = _eval(tokenizer, convs, 128, response_conversations=6, samples=6)
    refs = [s["reference"] for s in samples]
    assert len(refs) == 6 and len({r.split()[0] for r in refs}) > 1
    assert refs == [c["messages"][-1]["content"] for c in suite.fixed_sample(convs, 6)]  # the intent eval's sample
    assert _eval(tokenizer, convs, 128, response_conversations=6, samples=6)[1] == samples  # the same every time
