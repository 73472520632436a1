"""--max_token_length: sd-scripts' chunking and stitching, on the tiny SDXL's encoders and the real CLIP tokenizers."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserInputError
from library.model.text_encoding import check_max_token_length, encode_captions, encode_prompts, stitch_chunks, tokenize

BOS, EOS = 49406, 49407
SHORT = ["a photo of a cat", "a red square, blue background"]
LONG = ", ".join(f"tag{i} word{i}" for i in range(60))  # well over 150 tokens


def _plain_ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_flag_values():
    assert check_max_token_length(None) == 75
    assert [check_max_token_length(v) for v in (75, 150, 225)] == [75, 150, 225]
    with pytest.raises(UserInputError, match="--max_token_length 100 is not supported; use 75, 150 or 225"):
        check_max_token_length(100)


def test_75_tokens_are_one_plain_pass(tiny_models):
    for tok in (tiny_models.tokenizer1, tiny_models.tokenizer2):
        assert torch.equal(tokenize(tok, SHORT), _plain_ids(tok, SHORT))
    m = tiny_models
    with torch.no_grad():
        context, pooled = encode_captions(m, SHORT, 75)
        h1 = m.text_encoder1(_plain_ids(m.tokenizer1, SHORT), output_hidden_states=True).hidden_states[11]
        ids2 = _plain_ids(m.tokenizer2, SHORT)
        out2 = m.text_encoder2(ids2, output_hidden_states=True)
        eos_at = (ids2 == EOS).int().argmax(-1)
        pooled_ref = m.text_encoder2.text_projection(out2.last_hidden_state[torch.arange(2), eos_at])
    assert context.shape == (2, 77, h1.shape[-1] + out2.hidden_states[-2].shape[-1])
    assert torch.equal(context, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    assert torch.equal(pooled, pooled_ref)


def test_chunks_are_wrapped_like_sd_scripts(tiny_models):
    tok1, tok2 = tiny_models.tokenizer1, tiny_models.tokenizer2
    short1, short2 = tokenize(tok1, ["a photo of a cat"], 150), tokenize(tok2, ["a photo of a cat"], 150)
    assert short1.shape == short2.shape == (1, 2, 77)
    assert short1[0, 0].tolist() == _plain_ids(tok1, ["a photo of a cat"])[0].tolist()
    assert short2[0, 0].tolist() == _plain_ids(tok2, ["a photo of a cat"])[0].tolist()
    assert short1[0, 1].tolist() == [BOS] + [EOS] * 76  # empty chunk, TE1 pads with EOS
    assert short2[0, 1].tolist() == [BOS, EOS] + [0] * 75  # empty chunk, TE2: BOS EOS then pad 0

    long2 = tokenize(tok2, [LONG], 225)[0]
    full = tok2(LONG, truncation=True, max_length=227).input_ids
    assert long2.shape == (3, 77) and len(full) == 227
    for n in range(3):  # every chunk: BOS, its own 75 tokens, EOS (the text runs through all three)
        assert long2[n].tolist() == [BOS] + full[1 + 75 * n : 76 + 75 * n] + [EOS]


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_context_shape_and_first_chunk(tiny_models, max_token_length):
    with torch.no_grad():
        short, short_pooled = encode_captions(tiny_models, SHORT, 75)
        long, long_pooled = encode_captions(tiny_models, SHORT, max_token_length)
    assert long.shape == (2, max_token_length + 2, short.shape[-1])  # 152 or 227, as sd-scripts
    # BOS and the first 75 token states of a short caption are the 75-token pass; pooled from chunk 1.
    assert torch.allclose(long[:, :76], short[:, :76], atol=1e-6)
    assert torch.allclose(long_pooled, short_pooled, atol=1e-6)


def test_long_caption_reaches_past_75_tokens(tiny_models):
    other = LONG.replace("word20,", "giraffe,")  # differs only at about token 125
    with torch.no_grad():
        a75, _ = encode_captions(tiny_models, [LONG, other], 75)
        a225, pooled = encode_captions(tiny_models, [LONG, other], 225)
    assert torch.equal(a75[0], a75[1])  # truncated at 75 tokens: the change is invisible
    assert not torch.allclose(a225[0, 76:], a225[1, 76:])
    assert torch.allclose(a225[0, :76], a225[1, :76], atol=1e-6) and torch.allclose(pooled[0], pooled[1], atol=1e-6)


def test_stitch_drops_inner_bos_and_eos():
    hidden = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(6, 77, 1)  # B=2, n=3
    out = stitch_chunks(hidden, 2)
    assert out.shape == (2, 227, 1)
    flat = hidden.reshape(2, 231)
    expected = torch.cat([flat[:, :1], flat[:, 1:76], flat[:, 78:153], flat[:, 155:230], flat[:, 230:]], dim=1)
    assert torch.equal(out[..., 0], expected)


def test_chunked_ids_accepted_by_encode_prompts(tiny_models):
    m = tiny_models
    ids1, ids2 = tokenize(m.tokenizer1, SHORT, 150), tokenize(m.tokenizer2, SHORT, 150)
    with torch.no_grad():
        context, pooled = encode_prompts(m.text_encoder1, m.text_encoder2, ids1, ids2, m.tokenizer2.eos_token_id)
    assert context.shape[:2] == (2, 152) and pooled.shape[0] == 2
