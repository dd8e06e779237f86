"""Export fixes: LoRA on the embeddings or the output layer in the streamed merge, the base's own
stop tokens in generation_config.json, one sentence instead of a traceback for a run without its
tiny base or with a truncated adapter, the int8 kernel the model card names, a checkpoint path
given as the run directory, a relative --out in the card, a --checkpoint of another run."""

import json

import pytest
import torch

from model.stream_merge import merge_to_dir
from tests.test_stream_merge import _tiny


def _lora(model, targets, dora=False, grow=0):
    from peft import LoraConfig, get_peft_model

    if grow:
        model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + grow)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # B non-zero, magnitudes move
    return peft.eval()


@pytest.mark.parametrize("kind,targets,dora,grow", [("llama", ["lm_head", "v_proj"], False, 0),
                                                    ("llama", ["embed_tokens", "v_proj"], False, 0),
                                                    ("llama", ["embed_tokens", "lm_head", "q_proj"], True, 0),
                                                    ("llama", ["embed_tokens", "lm_head", "q_proj"], False, 5),
                                                    ("tied", ["lm_head", "v_proj"], False, 0),
                                                    ("tied", ["embed_tokens", "lm_head"], True, 5)])
def test_stream_merge_of_lora_on_embeddings_and_head(tmp_path, kind, targets, dora, grow):
    """PEFT saves <module>.base_layer.weight beside a LoRA'd embedding or head: it became a whole
    weight that replaced the base's and the LoRA update went nowhere ("weights the base lacks: lm_head"),
    and lora_embedding_A/B were not known at all. Now the same weights as merge_and_unload (untied
    bases), the same logits as base + adapter (tied ones too: the head is written untied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _tiny(kind).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    peft = _lora(_tiny(kind), targets, dora, grow)
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 300 + grow, (2, 12))
    with torch.no_grad():
        ref = peft(input_ids=ids).logits
    merge_to_dir(str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "out"), torch.float32, "30KB",
                 rows=300 + grow if grow else None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ref).abs().max() <= 1e-4
    if kind != "tied":
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        if grow:
            base.resize_token_embeddings(300 + grow)
        by_peft = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
        for key, value in merged.state_dict().items():
            assert torch.allclose(value, by_peft[key], atol=1e-6), key


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tokenizer):
    """A base directory (a small random Llama with the tiny tokenizer, whose generation_config.json
    stops at [2, 3], as Mistral-style bases do) and a LoRA adapter on it; no training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("small_run")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "base" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}))
    _lora(model, ["q_proj", "v_proj"]).save_pretrained(root / "adapter")
    return root


@pytest.mark.parametrize("stream_above_gb", [12.0, 0.0])
def test_the_base_stop_tokens_stay_in_the_export(small_run, tmp_path, tokenizer, stream_above_gb):
    """generation_config.json kept only the tokenizer's EOS and the end-of-turn token ([2, 4] for a
    base that stops at [2, 3]): both merge paths keep the base's own stop ids."""
    from data_pipeline.chat import end_of_turn_id
    from model.export import merge

    summary = merge(str(small_run / "adapter"), str(tmp_path / "out"), base_path=str(small_run / "base"), dtype="fp32",
                    stream_above_gb=stream_above_gb)
    want = sorted({2, 3, end_of_turn_id(tokenizer)})
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == want
    assert summary["eos_token_id"] == want


def _run_copy(run, dest, without=("merged",)):
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*without))
    return dest


def _errors(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("dialtune: error:")]


def test_a_run_copied_without_its_tiny_base_rebuilds_it(peft_runs, tmp_path, caplog):
    """`dialtune merge` of a model=tiny run without <run>/base ended in a 16-frame traceback ("Repo id
    must be in the form ..."): the base is rebuilt from the run's config, the same weights."""
    from safetensors.torch import load_file

    from launch.cli import main

    src = peft_runs["lora"]
    run = _run_copy(src, tmp_path / "run", ("merged", "base"))
    assert main(["merge", str(run), "--eval-conversations", "0"]) == 0
    assert "was missing: rebuilt from its config" in caplog.text
    for name in ("base", "merged"):
        want, got = load_file(str(src / name / "model.safetensors")), load_file(str(run / name / "model.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    import shutil

    shutil.rmtree(run / "base")  # `dialtune eval` of such a copy rebuilds it too
    assert main(["eval", str(run), "--parts", "lm"]) == 0 and (run / "base" / "config.json").is_file()


def test_a_truncated_adapter_or_a_missing_base_is_one_sentence(peft_runs, small_run, tmp_path, capsys):
    from launch.cli import main
    from model.export import ExportError, merge

    run = _run_copy(peft_runs["lora"], tmp_path / "run")
    (adapter,) = run.glob("checkpoints/step_*/adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # (an interrupted copy)
    assert main(["merge", str(run), "--eval-conversations", "0"]) == 2
    assert _errors(capsys) == [f"dialtune: error: {weights} cannot be read (Error while deserializing header: incomplete metadata, "
                               "file not fully covered); is the checkpoint complete? Pass another with --checkpoint."]
    assert not (run / "merged").exists() and not (run / "merged.tmp").exists()
    with pytest.raises(ExportError, match=f"^the base model {tmp_path / 'gone'} does not exist; put it back"):
        merge(str(small_run / "adapter"), str(tmp_path / "out"), base_path=str(tmp_path / "gone"))


def _card(run, out_dir, **cfg_changes):
    from omegaconf import OmegaConf
    from peft import PeftConfig

    from model.card import model_card

    cfg = OmegaConf.load(run / "config.yaml")
    for key, value in cfg_changes.items():
        OmegaConf.update(cfg, key, value)
    summary = json.loads((run / "merged" / "export_summary.json").read_text())
    summary["quant"] = cfg.quant.mode
    (adapter,) = run.glob("checkpoints/step_*/adapter")
    return model_card(summary, cfg, PeftConfig.from_pretrained(str(adapter)), out_dir)


def test_the_card_names_the_int8_kernel_that_ran(peft_runs):
    """kernels.fast_int8 (the default) trains through 16-bit GEMMs of the dequantized weights, no
    outlier decomposition; the card said "LLM.int8, outlier threshold 6.0" all the same."""
    run = peft_runs["lora"]
    fast = _card(run, "merged", **{"quant.mode": "int8", "kernels.fast_int8": True, "model.dtype": "bf16"})
    assert ("| base quantization during training | int8 (bitsandbytes int8 weights, dequantized per layer into bf16 GEMMs "
            "by `kernels.fast_int8`; no outlier decomposition) |") in fast and "outlier threshold" not in fast
    # the GEMMs run in the run's compute dtype (quant.compute_dtype under int8), not model.dtype's
    fp32 = _card(run, "merged", **{"quant.mode": "int8", "kernels.fast_int8": True, "model.dtype": "bf16",
                                   "quant.compute_dtype": "fp32"})
    assert "dequantized per layer into fp32 GEMMs" in fp32
    llm = _card(run, "merged", **{"quant.mode": "int8", "kernels.fast_int8": False})
    assert "| base quantization during training | int8 (LLM.int8, bitsandbytes, outlier threshold 6.0) |" in llm


def test_a_relative_out_is_named_absolute_in_the_card(peft_runs, tmp_path, monkeypatch):
    """`--out relout` wrote `path = 'relout'` and `dialtune chat relout` into the card, true only from
    the directory the merge ran in."""
    monkeypatch.chdir(tmp_path)
    card = _card(peft_runs["lora"], "relout")
    assert f"path = {str(tmp_path / 'relout')!r}" in card and f"`dialtune chat {tmp_path / 'relout'}`" in card
    assert "'relout'" not in card


def test_a_checkpoint_path_given_as_the_run_names_the_run_and_tag(peft_runs, capsys):
    """`dialtune merge <run>/checkpoints/step_N/adapter` said the adapter "lies inside the run
    directory <run>/checkpoints/step_N": a checkpoint, not the run."""
    from launch.cli import main

    run = peft_runs["lora"]
    (adapter,) = run.glob("checkpoints/step_*/adapter")
    assert main(["merge", str(adapter)]) == 2
    assert _errors(capsys) == [f"dialtune: error: {adapter} is not a dialtune run directory (no config.yaml); pass its run "
                               f"directory and the checkpoint: dialtune merge {run} --checkpoint {adapter.parent.name}."]


def test_another_runs_checkpoint_is_refused(peft_runs, tmp_path, capsys):
    """`--checkpoint ../../<other run>/checkpoints/step_N` merged the other run's adapter with this
    run's config, base and tokenizer, quietly; a path inside this run's checkpoints still works."""
    import os

    from launch.cli import main

    run = _run_copy(peft_runs["lora"], tmp_path / "run")
    other = peft_runs["dora"]
    (theirs,) = other.glob("checkpoints/step_*")
    for given in (os.path.relpath(theirs, run / "checkpoints"), str(theirs)):
        assert main(["merge", str(run), "--checkpoint", given, "--out", str(tmp_path / "out")]) == 2
        assert _errors(capsys) == [f"dialtune: error: --checkpoint {given} is not one of {run}'s checkpoints (a tag like step_N, "
                                   f"best or latest, or a path inside {run / 'checkpoints'}); for that run's: dialtune merge "
                                   f"{other} --checkpoint {theirs.name}."]
    assert not (tmp_path / "out").exists()
    (ours,) = run.glob("checkpoints/step_*")
    assert main(["merge", str(run), "--checkpoint", str(ours / "adapter"), "--out", str(tmp_path / "out"), "--eval-conversations", "0"]) == 0
    assert json.loads((tmp_path / "out" / "export_summary.json").read_text())["checkpoint"] == str(ours)
