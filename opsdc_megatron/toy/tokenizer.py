"""A word-level Hugging Face tokenizer for the toy task: one token per word, number and punctuation mark.

Built in code with the `tokenizers` library (no download) and saved with the model in the standard
format, so the rest of the project handles the toy model exactly like a real one: prompts go
through the chat template (`opsdc_megatron.prompts.encode_prompt`), responses end with eos, and
decoding with skip_special_tokens gives plain text such as "... Answer : 17" for the scorer.

Chat format (ids): <bos> <|user|> PROMPT-WORDS <|assistant|>, then the response and <eos>.
The teacher's prompt differs only by the instruction words after <|user|>.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opsdc_megatron.toy.task import MAX_NUMBER, vocabulary_words

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }}"
    "{% else %}{{ raise_exception('the toy chat template knows only user and assistant turns') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Rendered text is split on whitespace, so the blank line between instruction and prompt vanishes."""


def toy_vocabulary() -> list[str]:
    """Special tokens first (pad = 0), then the numbers 0..MAX_NUMBER, then the task's words."""
    return [*SPECIAL_TOKENS, *(str(n) for n in range(MAX_NUMBER + 1)), *vocabulary_words()]


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer with its chat template; deterministic (same vocabulary, same ids, every call)."""
    vocab = {token: index for index, token in enumerate(toy_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
