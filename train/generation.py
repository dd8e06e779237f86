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


class PromptTooLong(ValueError):
    """A prompt that cannot be cut to max_len without cutting into the chat template: its BOS, system
    message and role headers around an emptied last user message alone take `need` tokens."""

    def __init__(self, need: int, limit: int):
        super().__init__(f"the chat template, system message and headers take {need} tokens, more than {limit}")
        self.need, self.limit = need, limit


def render_prompt(tokenizer, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of messages rendered with the chat template plus the assistant header."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def drop_oldest_turns(messages: List[Dict[str, str]]) -> int:
    """Delete, in place, the oldest turns whole, up to the next user turn (the system message stays;
    the conversation still opens with a user turn); how many went (0 when one user turn is left)."""
    turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
    users = [i for i in turns if messages[i]["role"] == "user"]
    if len(users) <= 1:
        return 0
    del messages[turns[0]:users[1]]
    return users[1] - turns[0]


def prompt_ids(tokenizer, messages: List[Dict[str, str]], max_len: int) -> List[int]:
    """Chat-template prompt with the assistant header. Too long for max_len: the oldest turns go,
    whole and up to the next user turn (the system message stays), as training's keep_recent
    truncation does; a last user turn that alone is too long loses the start of its text, never
    the template around it (BOS, system message, headers). PromptTooLong when even an empty last
    user message does not fit; max_len <= 0: no limit."""
    msgs = list(messages)
    ids = render_prompt(tokenizer, msgs)
    while 0 < max_len < len(ids) and drop_oldest_turns(msgs):
        ids = render_prompt(tokenizer, msgs)
    if max_len <= 0 or len(ids) <= max_len:
        return ids
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last is None:
        raise PromptTooLong(len(ids), max_len)
    text = tokenizer(msgs[last]["content"], add_special_tokens=False)["input_ids"]
    keep = len(text) - (len(ids) - max_len)
    while True:  # (a cut can tokenize differently at its edge: measured again, shortened again)
        msgs[last] = {**msgs[last], "content": tokenizer.decode(text[len(text) - keep:]) if keep > 0 else ""}
        ids = render_prompt(tokenizer, msgs)
        if len(ids) <= max_len:
            return ids
        if keep <= 0:
            raise PromptTooLong(len(ids), max_len)
        keep -= len(ids) - max_len


def stop_ids_of(tokenizer, eot: int) -> List[int]:
    return sorted({eot, tokenizer.eos_token_id} - {None})
