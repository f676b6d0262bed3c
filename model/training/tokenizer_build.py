"""The embedded model's tokenizer: byte-level BPE trained on the project's own data, in DiffusionGemma's turn format.

Special tokens take the first ids (pad 0, eos 1, bos 2, then the turn and channel markers and the
image placeholders the config needs). Digits are split one per token, so arithmetic tasks see digits.
"""

from __future__ import annotations

import random

from model.training import tasks

SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
    "<mask>",
    "<|image|>",
    "<|image>",
    "<image|>",
]
TURN_START, TURN_END = SPECIALS.index("<|turn>"), SPECIALS.index("<turn|>")
IMAGE, BOI, EOI = SPECIALS.index("<|image|>"), SPECIALS.index("<|image>"), SPECIALS.index("<image|>")

# DiffusionGemma's turn format: the model turn opens with an empty thought channel; with enable_thinking, a
# system turn holding <|think|> comes first and the model turn opens bare (the model writes its thought channel).
# The embedded model was trained on the non-thinking form only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking %}<|turn>system\n<|think|>\n<turn|>\n{% endif %}"
    "{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)


def corpus(seed: int, n_task_lines: int = 20000) -> list[str]:
    rnd = random.Random(seed)
    lines = tasks.english_corpus()
    for _ in range(n_task_lines):
        e = tasks.make(rnd.choice(tasks.SINGLE + tasks.MANY), rnd)
        lines.append(f"{e.prompt}\n{e.answer}")
    lines += ["user\nmodel\nthought\n"] * 100
    return lines


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        mask_token="<mask>",
        additional_special_tokens=SPECIALS[3:8] + SPECIALS[9:],
    )
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} ids, wanted {vocab_size}")
    return fast
