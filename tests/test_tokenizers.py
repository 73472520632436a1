"""The shipped CLIP tokenizers (configs/sdxl/tokenizer*) give the real CLIP ids, and SDXL's two padding rules."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from library.model.loading import SHIPPED_CONFIG_DIR
from tools.build_clip_tokenizer_files import build, build_vocab, byte_symbols

BOS, EOS = 49406, 49407
BPE_SOURCE = Path("/tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz")  # from the open_clip_torch wheel


@pytest.fixture(scope="module")
def tokenizers():
    return (
        CLIPTokenizer.from_pretrained(SHIPPED_CONFIG_DIR / "tokenizer"),
        CLIPTokenizer.from_pretrained(SHIPPED_CONFIG_DIR / "tokenizer_2"),
    )


def test_real_clip_ids(tokenizers):
    for tok in tokenizers:
        assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
        assert tok("a photo of a dog").input_ids == [BOS, 320, 1125, 539, 320, 1929, EOS]
        assert tok("A  Photo OF a CAT.").input_ids == [BOS, 320, 1125, 539, 320, 2368, 269, EOS]  # lower-cased
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
        assert tok.convert_ids_to_tokens([0, 256, 512, 49405]) == ["!", "!</w>", "in", "jekyll</w>"]


def test_padding_differs_between_the_two(tokenizers):
    tok1, tok2 = tokenizers
    ids1 = tok1("a photo of a cat", padding="max_length", max_length=77).input_ids
    ids2 = tok2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids1) == len(ids2) == 77
    assert ids1[7:] == [EOS] * 70  # TE1 pads with <|endoftext|>
    assert ids2[7:] == [0] * 70  # TE2 pads with "!" (id 0)
    assert (tok1.pad_token_id, tok2.pad_token_id) == (EOS, 0)


def test_loaded_models_carry_the_same_tokenizers(tiny_models):
    ids = tiny_models.tokenizer2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:8] == [BOS, 320, 1125, 539, 320, 2368, EOS, 0]
    assert tiny_models.tokenizer1("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tiny_models.tokenizer1.pad_token_id == EOS


def test_vocabulary_layout():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and symbols[0] == "!" and symbols[93] == "~" and symbols[-1] == chr(256 + 67)
    vocab = build_vocab([("i", "n"), ("t", "h")] + [(f"x{i}", "y") for i in range(48892)])
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["th"] == 513
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


@pytest.mark.skipif(not BPE_SOURCE.is_file(), reason="needs bpe_simple_vocab_16e6.txt.gz (open_clip_torch wheel)")
def test_shipped_files_are_reproducible(tmp_path):
    build(BPE_SOURCE, tmp_path)
    for name in ["tokenizer", "tokenizer_2"]:
        files = sorted(p.name for p in (SHIPPED_CONFIG_DIR / name).iterdir())
        assert files == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
        match, mismatch, errors = filecmp.cmpfiles(SHIPPED_CONFIG_DIR / name, tmp_path / name, files, shallow=False)
        assert (mismatch, errors) == ([], [])
