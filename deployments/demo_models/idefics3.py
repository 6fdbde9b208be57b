"""A deterministic tiny random-weight Idefics3 vision-language model, in HF format.

Idefics3 because neither transformers' nor vLLM's code for it imports torchvision (whose
PyPI wheels are CUDA builds that fail to load beside CPU torch), and because it takes
several images per prompt. The tokenizer is a SentencePiece-style Unigram model with a
Metaspace pre-tokenizer, so random outputs decode to clean words; weights are drawn with a
wide spread so that different images visibly change greedy outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

NAME = "tiny-idefics3"
SEED = 3
VOCAB_SIZE = 1024
IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
#: Tokens per image: (32 / 8)^2 patches, merged 2x2 by pixel shuffle.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

#: Idefics3's own special tokens, as its processor looks them up.
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "<end_of_utterance>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]

#: Idefics3's chat format; also accepts plain-string content.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %} {{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tokenizer(rng: np.random.Generator):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["\u2581", "<|im_start|>", *string.ascii_letters, *string.digits, *string.punctuation, "\n"]
    pieces += ["\u2581" + c for c in string.ascii_lowercase]
    for role in ("User", "Assistant", "System"):
        pieces.append("\u2581" + role if role != "User" else role)
    letters = np.array(list(string.ascii_lowercase))
    seen = set(pieces) | set(SPECIAL_TOKENS)
    while len(pieces) + len(SPECIAL_TOKENS) < VOCAB_SIZE:
        word = "\u2581" + "".join(rng.choice(letters, size=int(rng.integers(2, 8))))
        if word not in seen:
            seen.add(word)
            pieces.append(word)
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + [(p, -10.0 / len(p)) for p in pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    return tokenizer


def generate(directory: Path, *, force: bool = False) -> Path:
    """Write the model, tokenizer, image processor and processor with ``save_pretrained``."""
    target = directory / NAME
    if target.exists() and not force:
        return target
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    rng = np.random.default_rng(SEED)
    tokenizer = _tokenizer(rng)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 64,  # a head size vLLM's CPU attention supports
            "max_position_embeddings": 32768,  # long enough for generations that take seconds
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # wide random weights: outputs depend visibly on the inputs
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5)
    image_processor = Idefics3ImageProcessor(
        do_resize=True,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )
    tmp = directory / f".{NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": tokenizer.eos_token_id})
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("wrote %s", target)
    return target
