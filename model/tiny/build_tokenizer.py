"""Build the embedded tiny tokenizer from the bundled sample text (no network).

A byte-level BPE trained on `data_pipeline/sample_data/*.jsonl`, with a ChatML chat template
whose assistant turns are wrapped in `{% generation %}` so transformers can return the
assistant-token mask. Distinct pad, bos, eos and end-of-turn tokens.

Usage: python model/tiny/build_tokenizer.py [OUT_DIR]   (default: model/tiny/tokenizer)
Deterministic: rebuilding gives the committed files (tested).
"""
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent.parent / "data_pipeline" / "sample_data"
VOCAB_SIZE = 4096
SPECIALS = ["<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    for path in sorted(SAMPLE.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "messages" in rec:
                    for m in rec["messages"]:
                        yield m["content"]
                else:
                    yield rec["text"]


def build(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else HERE / "tokenizer")
