"""Generation for the eval suite and chat: left-padded batches, prompts from the chat template,
decoding settings of the eval's own, and per-conversation random streams for sampling."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch


def _left_pad(rows: Sequence[Sequence[int]], fill: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows left-padded with fill, the mask of real positions)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = torch.as_tensor(r)
        mask[i, width - len(r):] = 1
    return out, mask


@contextmanager
def _neutral_generation_config(model):
    """Only the eval's own decoding settings: the base model's generation_config.json (e.g.
    repetition_penalty 1.05 and top_k 20 in Qwen2.5-Instruct) would otherwise fill every setting
    the eval leaves unset, so "greedy" would depend on the base. (transformers merges those
    defaults into an explicit GenerationConfig too, hence the swap.)"""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(target, "generation_config", None)
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


class RowSampler:
    """Sampling that gives each sequence its own random stream: the next token is the argmax of the
    (temperature-scaled, top-p-filtered) logits plus Gumbel noise drawn from that row's generator
    (the Gumbel-max trick: exactly a draw from the softmax). A conversation's sample then does not
    depend on which batch or rank it lands in, as one shared stream for the whole batch would."""

    def __init__(self, seeds: Sequence[int], dev, temperature: float = 1.0, top_p: float = 1.0):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        self.warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = self.warpers(input_ids, scores.float())
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.gens])
        return scores - torch.log(-torch.log(u))  # (u in [0, 1): -inf noise at u = 0 is never picked)


@torch.no_grad()
def generate(model, tokenizer, prompts: List[List[int]], dev, max_new_tokens: int, stop_ids: Sequence[int],
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, synced: bool = False,
             seeds: Optional[Sequence[int]] = None):
    """Left-padded batched generation -> [(new tokens up to the first stop token, stopped?)].
    sample: each prompt draws from its own generator, seeded with its entry of seeds (RowSampler)."""
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id
    ids, mask = _left_pad(prompts, pad)
    width = ids.shape[1]
    sampler = RowSampler(seeds if seeds is not None else range(len(prompts)), dev, temperature, top_p) if sample else None
    with _neutral_generation_config(model):  # (greedy over the sampler's noisy scores is the sample)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             eos_token_id=list(stop_ids), pad_token_id=pad, synced_gpus=synced, do_sample=False,
                             logits_processor=LogitsProcessorList([sampler] if sampler else []))
    res = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        res.append((row[:cut] if cut is not None else row, cut is not None))
    return res


def prompt_ids(tokenizer, messages: List[Dict[str, str]], max_len: int) -> List[int]:
    """Chat-template prompt with the assistant header. Too long for max_len: the oldest turns go,
    whole and up to the next user turn (the system message stays), as training's keep_recent
    truncation does; only a last user turn that alone is too long is cut, from the left."""
    msgs = list(messages)
    while True:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        users = [i for i in turns if msgs[i]["role"] == "user"]
        if max_len <= 0 or len(ids) <= max_len or len(users) <= 1:
            return ids[-max_len:] if max_len > 0 else ids
        del msgs[turns[0]:users[1]]  # up to the second user turn: the conversation still opens with the user


def stop_ids_of(tokenizer, eot: int) -> List[int]:
    return sorted({eot, tokenizer.eos_token_id} - {None})
