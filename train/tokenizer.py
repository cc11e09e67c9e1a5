"""Tokenizers for training: a local Hugging Face one, or a byte-level one that fits the tiny vocab.

Nothing can be downloaded, so a real tokenizer must be a local directory. The byte tokenizer is
deterministic and needs no files: byte b becomes id ``FIRST_TEXT_ID + b % 240``, which stays below
the tiny config's special ids (250..253) and above pad/bos/eos (0, 1, 2). It is lossy (only for
tests and synthetic runs), never for a real vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.synthetic import FIRST_TEXT_ID

BYTE_MODULUS = 240


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    video: int
    vision_start: int
    vision_end: int


class ByteTokenizer:
    """UTF-8 bytes folded into ``[FIRST_TEXT_ID, FIRST_TEXT_ID + 240)``."""

    def __init__(self, model_config):
        if model_config.text_config.vocab_size < FIRST_TEXT_ID + BYTE_MODULUS:
            raise ValueError(f"the byte tokenizer needs a vocab of >= {FIRST_TEXT_ID + BYTE_MODULUS} ids")
        text = model_config.text_config
        self.special = SpecialIds(
            pad=text.pad_token_id or 0,
            eos=text.eos_token_id if isinstance(text.eos_token_id, int) else 2,
            video=model_config.video_token_id,
            vision_start=model_config.vision_start_token_id,
            vision_end=model_config.vision_end_token_id,
        )

    def encode(self, text: str) -> list[int]:
        return [FIRST_TEXT_ID + b % BYTE_MODULUS for b in text.encode("utf-8")]


class HFTokenizer:
    """A local ``AutoTokenizer`` directory (Qwen's), special ids read from the model config."""

    def __init__(self, path: str, model_config):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if eos is None or eos == self.tokenizer.unk_token_id:
            eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.special = SpecialIds(
            pad=pad if pad is not None else eos,
            eos=eos,
            video=model_config.video_token_id,
            vision_start=model_config.vision_start_token_id,
            vision_end=model_config.vision_end_token_id,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def load_tokenizer(spec: str, model_config):
    return ByteTokenizer(model_config) if spec == "byte" else HFTokenizer(spec, model_config)
