"""Captions to token ids: the one place both the training loader's workers and the model's own
encoders (prompts, held-out captions, precompute) tokenize, so both give the same ids. Here, in
the model package, because the tokenizers belong to the model folder; the data path only calls
the `CaptionTokenizer` it is handed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The batch key of each text encoder's ids, in the encoders' order (SD has the first only).
ID_KEYS = ("input_ids", "input_ids_2")


def tokenize_captions(tokenizer: Any, captions: list[str], length: int) -> torch.Tensor:
    """Token ids [B, length] (int64) of `captions`, padded and truncated to `length`: a text
    encoder's input."""
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@dataclass(frozen=True)
class CaptionTokenizer:
    """Owns the tokenizers of a model (one for SD, two for SDXL) and each one's caption length.
    Called with captions, it returns each encoder's ids under ID_KEYS. A CLIPTokenizer is
    picklable, so this travels to spawned loader workers too."""

    tokenizers: tuple[Any, ...]
    lengths: tuple[int, ...]

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {key: tokenize_captions(tok, captions, n) for key, tok, n in zip(ID_KEYS, self.tokenizers, self.lengths)}
