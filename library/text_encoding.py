"""SDXL text conditioning: two CLIP encoders -> context (B, 77, 768+1280) and pooled (B, 1280).

TE1 contributes hidden_states[11], TE2 its penultimate hidden state; the pooled vector is TE2's
text_projection of the final-layer-norm state at the first end-of-text token. Added time ids are
original size (h, w), crop top-left (top, left) and target size (h, w).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(B, 77) token ids, padded with the tokenizer's own pad token (TE2 pads with id 0)."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(
    text_encoder1: nn.Module,
    text_encoder2: nn.Module,
    input_ids1: torch.Tensor,
    input_ids2: torch.Tensor,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for already tokenized captions."""
    hidden1 = text_encoder1(input_ids1, output_hidden_states=True).hidden_states[11]
    out2 = text_encoder2(input_ids2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    first_eos = (input_ids2 == eos_token_id).int().argmax(dim=-1)
    final_states = out2.last_hidden_state[torch.arange(input_ids2.shape[0], device=input_ids2.device), first_eos]
    pooled = text_encoder2.text_projection(final_states)
    context = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
    return context, pooled


def time_ids(
    original_sizes_hw: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor
) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_sizes_hw, crop_top_lefts, target_sizes_hw], dim=1).float()
