"""Tokenizer and processor for the locally built (tiny) Qwen-Image-Edit model, made with no hub access.

A byte-level BPE with the Qwen2 pre-tokenizer regex and the 22 Qwen2 special tokens, trained on a fixed
in-file corpus (deterministic), wrapped in transformers' real Qwen2Tokenizer and Qwen2VLProcessor: the
same classes the real model's tokenizer/ and processor/ folders load into.
"""

from __future__ import annotations

import json

# Same regex transformers' Qwen2Tokenizer uses.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In the order of the real Qwen2.5 ids 151643..151664.
QWEN2_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# The edit pipeline's system prompt and the kind of prompts users send, so common words get merges.
CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "Picture 1: Picture 2: Picture 3: system user assistant\nsystem\nuser\nassistant\n",
    "James Bond 007, wearing a tuxedo with bow tie, holding a martini glass, casino background, cinematic lighting.",
    "Neo from The Matrix, wearing long black leather trench coat, dark sunglasses, green digital rain code.",
    "Tech CEO presenting on stage at a conference, modern blue lighting, professional speaker, sleek backdrop.",
    "The person turns slightly towards the camera and smiles, subtle natural motion, golden hour, portrait.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ' \" ( ) - + = / # & *",
]

QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_qwen2_tokenizer(bpe_vocab_size: int = 1024):
    """A real transformers Qwen2Tokenizer with a small vocabulary and the Qwen2 special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_vocab_size)
    base = len(vocab)
    for i, token in enumerate(QWEN2_SPECIAL_TOKENS):
        vocab[token] = base + i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", errors="replace", model_max_length=32768,
        additional_special_tokens=[t for t in QWEN2_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    for i, token in enumerate(QWEN2_SPECIAL_TOKENS):  # adding specials must not renumber them
        if tokenizer.convert_tokens_to_ids(token) != base + i:
            raise RuntimeError(f"special token {token} was renumbered")
    return tokenizer


def qwen2_token_ids(tokenizer) -> dict[str, int]:
    """The ids a Qwen2_5_VLConfig needs so that it agrees with `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )


def build_qwen2vl_processor(tokenizer, min_pixels: int = 3136, max_pixels: int = 12845056):
    """Qwen2VLProcessor as in Qwen-Image-Edit's processor/ folder (patch 14, merge 2, temporal 2)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )


def build_t5_tokenizer(vocab_size: int = 512):
    """A T5/UMT5-style Unigram tokenizer (pad=0, </s>=1, <unk>=2) in transformers' T5Tokenizer, for tiny Wan."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    vocab = [tuple(x) for x in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    if (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) != (0, 1, 2):
        raise RuntimeError("T5 special tokens were renumbered")
    return t5
