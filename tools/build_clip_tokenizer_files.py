"""Build the CLIP tokenizer folders of SDXL (``tokenizer/`` and ``tokenizer_2/``) from the CLIP BPE file.

Usage::

    python tools/build_clip_tokenizer_files.py SRC_GZ OUT_DIR

``SRC_GZ`` is ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside the open_clip_torch wheel and OpenAI's CLIP
repository). ``OUT_DIR`` receives ``tokenizer/`` (SDXL's TE1 tokenizer, pads with ``<|endoftext|>``) and
``tokenizer_2/`` (TE2's, pads with ``!`` = id 0), each holding ``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` and ``special_tokens_map.json`` in the layout transformers' ``CLIPTokenizer`` reads.

The vocabulary is built the way OpenAI's CLIP builds it: the 256 byte symbols, the same with ``</w>``,
one token per merge (the first 48,894 merges of the file), then ``<|startoftext|>`` and ``<|endoftext|>``:
49,408 tokens. The output is deterministic, so the files in ``configs/sdxl`` can be rebuilt and diffed.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
MODEL_MAX_LENGTH = 77


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255 used by byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first (in byte order); every other byte b is the
    character ``chr(256 + k)`` where k counts those bytes in order. The list is ordered like CLIP's vocab:
    first the self-mapped bytes, then the shifted ones.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(shifted))]


def read_merges(src_gz: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..48,894 of the BPE file (line 0 is a version header)."""
    lines = gzip.open(src_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{src_gz}: expected {N_MERGES} merge lines of two symbols each")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in OpenAI CLIP's order."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def tokenizer_config(pad_token: str) -> dict[str, object]:
    """``tokenizer_config.json`` of an SDXL CLIP tokenizer that pads with ``pad_token``."""
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map(pad_token: str) -> dict[str, str]:
    """``special_tokens_map.json`` of an SDXL CLIP tokenizer that pads with ``pad_token``."""
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_dir(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    """Write one tokenizer folder."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tokenizer_config(pad_token))
    _write_json(out / "special_tokens_map.json", special_tokens_map(pad_token))


def build(src_gz: Path, out_dir: Path) -> list[Path]:
    """Write ``out_dir/tokenizer`` (pads with EOS) and ``out_dir/tokenizer_2`` (pads with "!"); return them."""
    merges = read_merges(src_gz)
    vocab = build_vocab(merges)
    written = []
    for name, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):
        write_tokenizer_dir(out_dir / name, vocab, merges, pad)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_gz", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="folder that receives tokenizer/ and tokenizer_2/")
    args = parser.parse_args(argv)
    for path in build(args.src_gz, args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
