"""`dialtune chat`: talk to a merged checkpoint with its own chat template.

    dialtune chat outputs/demo                       # a run directory: its merged/ checkpoint
    dialtune chat outputs/demo/merged --system "You are the support agent of Acme."   # default: the run's own
    dialtune chat outputs/demo --prompt "Where is my order?" --max-new-tokens 64   # one answer, for scripts

Interactive mode streams the answer token by token and keeps the conversation (`/reset` starts
over, `/exit` or Ctrl-D leaves, Ctrl-C stops the answer being written). Generation stops at the
checkpoint's generation_config eos tokens and at the chat template's end-of-turn token
(`<|im_end|>` for the tiny tokenizer). Prompt and answer fit the model's context
(max_position_embeddings): the oldest turns are left out, then the answer shortened, each with a
note on stderr; a message that alone leaves no room is refused (the chat goes on without it).
`--temperature 0` (the default) is greedy decoding. Without --system, the
system prompt the run's training sources set (data.sources[].system_prompt) is used when all of
them set the same one, as the model saw it in training (stderr says so).
"""
from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class ChatError(Exception):
    """A user-fixable problem: one sentence, exit code 2."""


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="chat with a merged checkpoint (or a run directory's merged/)")
    c.add_argument("checkpoint", help="merged checkpoint directory, or a run directory (uses its merged/)")
    c.add_argument("--prompt", default=None, help="answer this one user message on stdout and exit (non-interactive)")
    c.add_argument("--system", default=None,
                   help="system message put first in the conversation (default: the system prompt the run's "
                        "training data.sources set, when all set the same one; --system '' for none)")
    c.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest answer in tokens (default 256); prompt and answer must fit the model's context, "
                        "max_position_embeddings in its config.json: the oldest turns are left out, then the answer "
                        "is shortened (stderr says so), and a message that alone leaves no room is refused")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    c.set_defaults(fn=cmd_chat)


def resolve_checkpoint(path: str) -> Path:
    """The merged checkpoint directory for a checkpoint or a run directory."""
    p = Path(path)
    if not p.exists():
        raise ChatError(f"{path} does not exist; pass a merged checkpoint directory or a run directory.")
    if (p / "config.json").is_file():
        return p
    if (p / "merged" / "config.json").is_file():
        return p / "merged"
    if (p / "trainer_state.json").is_file():  # <run>/checkpoints/step_N
        raise ChatError(f"{path} is a training checkpoint (adapter and optimizer state), not a merged model; write one with "
                        f"`dialtune merge {path} --out {p.parent.parent / ('merged-' + p.name)}` and chat with that.")
    if (p / "config.yaml").is_file():
        raise ChatError(f"run directory {path} has no merged checkpoint yet; write one with `dialtune merge {path}`.")
    raise ChatError(f"{path} is neither a merged checkpoint (no config.json) nor a dialtune run directory with merged/.")


def merged_behind_note(ckpt: Path) -> str:
    """A note for a run's merged/ that holds an older checkpoint than the run's latest (a resumed run
    with export.merge_at_end=false, an end merge that failed), naming both and the merge that
    catches up; "" when it holds the latest, or the checkpoint the run chose (export.checkpoint=best,
    `dialtune merge --checkpoint`: summary.json's export_checkpoint, when summary.json is the latest's)."""
    import json

    from model.export_io import exported_from

    run, latest_file = ckpt.parent, ckpt.parent / "checkpoints" / "latest"
    src = exported_from(str(ckpt)) if ckpt.name == "merged" and latest_file.is_file() else None
    if not src:
        return ""
    held, latest = Path(src).name, latest_file.read_text().strip()
    if held == latest:
        return ""
    try:
        summary = json.loads((run / "summary.json").read_text())
        if Path(summary.get("checkpoint") or "").name == latest and Path(summary.get("export_checkpoint") or "").name == held:
            return ""
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return (f"{ckpt} holds {held} (its export_summary.json), not the run's latest checkpoint {latest}; "
            f"`dialtune merge {run}` merges the latest")


def run_system_prompt(path: str) -> Tuple[Optional[str], str]:
    """(prompt, note) for chatting with the checkpoint at path as it was trained: the system prompt
    that its run's training sources put first (data.sources[].system_prompt), when all of them set
    the same one. The run is the one export_summary.json names (else the directory that holds
    merged/); the note says what was used or why nothing was, for stderr ("" when none was set)."""
    import json

    from omegaconf import OmegaConf

    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent
    summary = ckpt / "export_summary.json"
    if summary.is_file():  # the run the merge came from, wherever it was written (--out)
        try:
            named = Path(json.loads(summary.read_text()).get("run_dir") or "")
            if str(named) != "." and (named / "config.yaml").is_file():  # Path("") is "."
                run_dir = named
        except (ValueError, OSError, AttributeError, TypeError):
            pass
    if not (run_dir / "config.yaml").is_file():
        return None, ""
    try:
        data = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "data", default=None)
        sources = list(data.get("sources") or []) if data is not None else []
        plain_files = len(data.get("train_files") or []) if data is not None else 0
    except Exception:  # noqa: BLE001 - an unreadable run config only costs the default
        return None, ""
    prompts, without = {}, plain_files
    for i, src in enumerate(sources):
        if src.get("split", "train") != "train":
            continue
        if src.get("system_prompt"):
            prompts.setdefault(src.system_prompt, f"data.sources[{i}].system_prompt")
        else:
            without += 1
    if len(prompts) == 1 and not without:
        ((prompt, field),) = prompts.items()
        return prompt, f"using the run's system prompt ({field} in {run_dir / 'config.yaml'}); --system '' chats without one"
    if prompts:
        return None, (f"the run's training sources set {len(prompts)} system prompt(s) ({', '.join(prompts.values())})"
                      f"{f' and {without} set none' if without else ''}; none is used: pick one with --system")
    return None, ""


def load(path: str, device: Optional[str] = None):
    """(model, tokenizer, device) of a merged checkpoint; ChatError when it cannot be used."""
    import torch

    ckpt = resolve_checkpoint(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        dev = pick_device(device)
    except ValueError as e:
        raise ChatError(str(e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
        raise ChatError(f"{ckpt} has no usable tokenizer ({_first_line(e)}).") from None
    if not tokenizer.chat_template:
        raise ChatError(f"the tokenizer in {ckpt} has no chat template, so conversations cannot be rendered.")
    try:
        # CPU: fp32 (bf16 matmuls are slow or missing there); GPU: the checkpoint's own dtype.
        dtype = torch.float32 if dev.type == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(dev).eval()
    except Exception as e:  # noqa: BLE001
        raise ChatError(f"{ckpt} could not be loaded as a model ({_first_line(e)}).") from None
    return model, tokenizer, dev


def pick_device(name: Optional[str]):
    """--device as a torch.device (default: cuda when available, else cpu); ValueError with one
    sentence for a name torch does not know or a CUDA device this machine lacks."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                         "CUDA GPU(s) torch can use; use --device cpu or another GPU index.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported.")
    return dev


def _first_line(e: BaseException, limit: int = 240) -> str:
    """A library error as part of one sentence: its lines joined (a first line that ends in ':'
    means nothing alone), cut at `limit` characters."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
    return text.rstrip(".") if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def generation_kwargs(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float = 1.0) -> Dict:
    """generate() arguments: the checkpoint's generation_config, its eos ids joined by the chat
    template's end-of-turn token and the tokenizer's EOS (stop_ids_of, as the eval stops: a merge
    not written by dialtune may list neither), greedy for temperature 0."""
    import copy

    from data_pipeline.chat import end_of_turn_id
    from train.generation import stop_ids_of

    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens = max_new_tokens
    gen.max_length = None
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = sorted({*eos, *stop_ids_of(tokenizer, end_of_turn_id(tokenizer))} - {None})
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if temperature > 0:
        gen.do_sample, gen.temperature, gen.top_p = True, temperature, top_p
    else:
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    return {"generation_config": gen}


def encode(tokenizer, messages: List[Dict[str, str]], device):
    """Render with the chat template plus the assistant header, as generate() inputs."""
    import torch

    from train.generation import render_prompt

    ids = torch.tensor([render_prompt(tokenizer, messages)], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _fit_history(model, tokenizer, messages, max_new_tokens, device):
    """(inputs, max_new_tokens) that fit the model's context (config.json's max_position_embeddings):
    the oldest turns are dropped from messages, whole (never the system message or the last user
    turn), until the prompt leaves room for max_new_tokens; then max_new_tokens is lowered to the room
    left. Each says so on stderr; a prompt that leaves no room at all is a ChatError."""
    from train.generation import drop_oldest_turns

    limit = getattr(model.config, "max_position_embeddings", None)
    msgs = list(messages)  # (the history changes only when the message is sent)
    inputs = encode(tokenizer, msgs, device)
    dropped = 0
    while limit and inputs["input_ids"].shape[1] + max_new_tokens > limit and (gone := drop_oldest_turns(msgs)):
        dropped += gone
        inputs = encode(tokenizer, msgs, device)
    n, where = inputs["input_ids"].shape[1], "max_position_embeddings in its config.json"
    if limit and n >= limit:
        raise ChatError(f"this message takes {n} tokens with the chat template{' and the system message' if msgs[0]['role'] == 'system' else ''}, "
                        f"leaving no room for an answer in the model's context of {limit} tokens ({where}); send a shorter one.")
    if dropped:
        messages[:] = msgs
        print(f"dialtune chat: left out the {dropped} oldest turn(s) of the conversation to fit the model's context of "
              f"{limit} tokens ({where})", file=sys.stderr)
    if limit and n + max_new_tokens > limit:
        print(f"dialtune chat: this answer stops at {limit - n} new tokens, not --max-new-tokens {max_new_tokens}: the "
              f"prompt takes {n} of the model's context of {limit} tokens ({where})", file=sys.stderr)
        max_new_tokens = limit - n
    return inputs, max_new_tokens


def answer(model, tokenizer, messages, device, max_new_tokens=256, temperature=0.0, top_p=1.0) -> str:
    """One assistant turn for messages (non-streaming); ChatError when the prompt leaves no room."""
    import torch

    inputs, max_new_tokens = _fit_history(model, tokenizer, messages, max_new_tokens, device)
    with torch.no_grad():
        out = model.generate(**inputs, **generation_kwargs(model, tokenizer, max_new_tokens, temperature, top_p))
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _stream_answer(model, tokenizer, messages, device, args, prefix: str = "") -> str:
    """Stream one assistant turn to stdout (after prefix, once the prompt fits); its text."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Interrupt(StoppingCriteria):
        stop = False

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)

    inputs, max_new_tokens = _fit_history(model, tokenizer, messages, args.max_new_tokens, device)
    print(prefix, end="", flush=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    interrupt = Interrupt()
    result: Dict = {}

    def run():
        try:
            with torch.no_grad():
                result["ids"] = model.generate(**inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([interrupt]),
                                               **generation_kwargs(model, tokenizer, max_new_tokens, args.temperature, args.top_p))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        interrupt.stop = True
        try:
            for _ in streamer:  # drain until generate() returns
                pass
            thread.join()
        except KeyboardInterrupt:  # a second Ctrl-C while it winds down: leave now, quietly
            print(" [stopped]", flush=True)
            raise SystemExit(130) from None
        print(" [stopped]", end="")
    thread.join()
    print(flush=True)
    if "error" in result:
        raise result["error"]
    return tokenizer.decode(result["ids"][0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def interactive(model, tokenizer, device, args) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    tty = sys.stdin.isatty()
    if tty:
        print("dialtune chat: type a message; /reset starts over, /exit (or Ctrl-D) leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream_answer(model, tokenizer, messages, device, args, "assistant> " if tty else "")
        except ChatError as e:  # not sent: the conversation goes on without it
            messages.pop()
            print(f"dialtune chat: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def cmd_chat(args) -> int:
    try:
        if args.max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens={args.max_new_tokens} must be at least 1.")
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise ChatError(f"--temperature={args.temperature} must be 0 (greedy) or a positive finite number.")
        if args.temperature > 0 and not 0 < args.top_p <= 1:  # (greedy decoding reads no top-p)
            raise ChatError(f"--top-p={args.top_p} must be in (0, 1].")
        if args.prompt is not None and not args.prompt.strip():
            raise ChatError("--prompt is empty: give the user's message (or leave --prompt out to chat interactively).")
        model, tokenizer, device = load(args.checkpoint, args.device)
    except ChatError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    behind = merged_behind_note(resolve_checkpoint(args.checkpoint))
    if behind:
        print(f"dialtune chat: note: {behind}", file=sys.stderr)
    if args.system is None:
        args.system, note = run_system_prompt(args.checkpoint)
        if note:
            print(f"dialtune chat: {note}", file=sys.stderr)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        try:
            print(answer(model, tokenizer, messages, device, args.max_new_tokens, args.temperature, args.top_p))
        except ChatError as e:
            print(f"dialtune: error: {e}", file=sys.stderr)
            return 2
        return 0
    return interactive(model, tokenizer, device, args)


def main(argv=None) -> int:
    """`python -m launch.chat ...` = `dialtune chat ...`."""
    from launch.cli import main as cli_main, quiet_exit

    try:
        return cli_main(["chat", *(sys.argv[1:] if argv is None else argv)])
    finally:
        if argv is None:
            quiet_exit()


if __name__ == "__main__":
    sys.exit(main())
