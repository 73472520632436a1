"""SDXL text conditioning: two CLIP encoders -> context (B, 75n+2, 768+1280) and pooled (B, 1280).

TE1 contributes hidden_states[11], TE2 its penultimate hidden state; the pooled vector is TE2's
text_projection of the final-layer-norm state at the first end-of-text token. Added time ids are
original size (h, w), crop top-left (top, left) and target size (h, w).

Long captions (`--max_token_length` 150 or 225) follow sd-scripts: the caption is tokenized to
max_token_length + 2 ids, cut into n = max_token_length / 75 chunks of 75 tokens each wrapped in BOS/EOS
(77 ids, what CLIP takes), every chunk encoded on its own, and the hidden states stitched back to
BOS + 75n token states + the last chunk's final state (the inner BOS/EOS states are dropped). The pooled
vector comes from the first chunk. With 75 (the default) this is exactly one plain 77-token pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from library.errors import UserInputError

CHUNK_TOKENS = 75
"""Caption tokens per CLIP pass (77 ids minus BOS and EOS)."""
MAX_TOKEN_LENGTHS = (75, 150, 225)
"""The values sd-scripts accepts for `--max_token_length`."""


def check_max_token_length(value: int | None) -> int:
    """`--max_token_length` as a number of caption tokens (None = 75); anything else is one clear line."""
    if value is None:
        return CHUNK_TOKENS
    if value not in MAX_TOKEN_LENGTHS:
        raise UserInputError(f"--max_token_length {value} is not supported; use 75, 150 or 225 (or leave it out)")
    return int(value)


def tokenize(tokenizer, captions: Sequence[str], max_token_length: int = CHUNK_TOKENS) -> torch.Tensor:
    """Token ids: (B, 77) for 75 tokens, else (B, n, 77) chunks (see the module docstring).

    Padding is the tokenizer's own (TE2 pads with id 0). As in sd-scripts, a chunk whose text runs to its end
    gets an EOS as its last id, and an empty chunk starts BOS EOS pad...
    """
    chunk_len = tokenizer.model_max_length  # 77
    if max_token_length <= chunk_len - 2:
        return tokenizer(
            list(captions), padding="max_length", max_length=chunk_len, truncation=True, return_tensors="pt"
        ).input_ids
    ids = tokenizer(
        list(captions), padding="max_length", max_length=max_token_length + 2, truncation=True, return_tensors="pt"
    ).input_ids
    return torch.stack([_chunk_ids(row, tokenizer, max_token_length) for row in ids])


def _chunk_ids(ids: torch.Tensor, tokenizer, max_token_length: int) -> torch.Tensor:
    """One caption's max_token_length + 2 ids -> (n, 77): BOS, 75 ids, then EOS or pad (sd-scripts' rule)."""
    inner = tokenizer.model_max_length - 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_token_length + 1, inner):
        chunk = torch.cat([ids[:1], ids[start : start + inner], ids[-1:]])
        if chunk[-2] not in (eos, pad):  # text runs to the chunk's end: close it with EOS
            chunk[-1] = eos
        if chunk[1] == pad:  # an empty chunk: BOS EOS pad ...
            chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def stitch_chunks(hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B*n, 77, D) chunk states -> (B, 75n+2, D): BOS of the first chunk, each chunk's 75 token states,
    the final state of the last chunk (sd-scripts' `get_hidden_states_sdxl`). n = 1 returns the states as they are."""
    chunk_len = hidden.shape[1]
    hidden = hidden.reshape(batch_size, -1, hidden.shape[-1])
    if hidden.shape[1] == chunk_len:
        return hidden
    parts = [hidden[:, :1]]
    parts += [hidden[:, start : start + chunk_len - 2] for start in range(1, hidden.shape[1], chunk_len)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def encode_prompts(
    text_encoder1: nn.Module,
    text_encoder2: nn.Module,
    input_ids1: torch.Tensor,
    input_ids2: torch.Tensor,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for already tokenized captions: ids (B, 77) or chunked (B, n, 77)."""
    batch_size = input_ids1.shape[0]
    ids1 = input_ids1.reshape(-1, input_ids1.shape[-1])
    ids2 = input_ids2.reshape(-1, input_ids2.shape[-1])
    num_chunks = ids2.shape[0] // batch_size
    hidden1 = text_encoder1(ids1, output_hidden_states=True).hidden_states[11]
    out2 = text_encoder2(ids2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    first_eos = (ids2 == eos_token_id).int().argmax(dim=-1)
    final_states = out2.last_hidden_state[torch.arange(ids2.shape[0], device=ids2.device), first_eos]
    pooled = text_encoder2.text_projection(final_states)[::num_chunks]  # the first chunk of each caption
    hidden1, hidden2 = stitch_chunks(hidden1, batch_size), stitch_chunks(hidden2, batch_size)
    context = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
    return context, pooled


def encode_captions(
    models, captions: Sequence[str], max_token_length: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and encode captions with both encoders of `models` (an `SDXLModels`): (context, pooled)."""
    ids1 = tokenize(models.tokenizer1, captions, max_token_length).to(device)
    ids2 = tokenize(models.tokenizer2, captions, max_token_length).to(device)
    return encode_prompts(models.text_encoder1, models.text_encoder2, ids1, ids2, models.tokenizer2.eos_token_id)


def time_ids(
    original_sizes_hw: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor
) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_sizes_hw, crop_top_lefts, target_sizes_hw], dim=1).float()
