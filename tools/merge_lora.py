#!/usr/bin/env python
"""Merge LoRA files into an SDXL single file (original layout), with sd-scripts' `sdxl_merge_lora.py` flags.

    python tools/merge_lora.py --sd_model BASE.safetensors --models A.safetensors B.safetensors \
        --ratios 1.0 0.5 --save_to OUT.safetensors [--save_precision fp16|bf16|float] [--precision float]

W += ratio * (alpha / rank) * up @ down for every module (3x3 conv LoRAs: the composed kernel), computed in
`--precision`. The base file is streamed tensor by tensor (memory stays near one tensor plus the LoRAs); tensors no
LoRA touches are copied byte for byte. Unlike sd-scripts, the output keeps the base file's dtype unless
`--save_precision` is given (sd-scripts saves in the merge precision, so an fp16 model came out fp32), and a
LoRA module that matches no weight of the model is an error instead of a skipped log line.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from library.errors import RunStopped, UserInputError  # noqa: E402

PRECISIONS = ("float", "fp16", "bf16")


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd_model", required=True, help="SDXL single file (.safetensors, original layout)")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files (.safetensors) to merge")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help="strength of each LoRA, one per --models entry (default: 1.0 each)",
    )
    parser.add_argument("--save_to", required=True, help="output single file (.safetensors)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float", help="dtype the merge is computed in (float is recommended)"
    )
    parser.add_argument(
        "--save_precision",
        choices=PRECISIONS,
        default=None,
        help="dtype of every floating-point tensor of the output (default: keep the base file's)",
    )
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="write no metadata (by default it records the base model, the LoRAs and their ratios)",
    )
    return parser


def _dtype(name: str | None):
    import torch

    return None if name is None else {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _check_inputs(args: argparse.Namespace) -> list[float]:
    """The ratios, after checking the paths; raises UserInputError (one line)."""
    from library.files.lora_merge import read_safetensors_header

    base = Path(args.sd_model)
    if not base.is_file():
        raise UserInputError(f"--sd_model: no such file: {base}")
    if base.suffix.lower() != ".safetensors":
        raise UserInputError(f"--sd_model: {base} is not a .safetensors file (.ckpt is not supported)")
    entries, _, _ = read_safetensors_header(base)
    if not any(k.startswith("model.diffusion_model.") for k in entries):
        raise UserInputError(f"--sd_model: {base} holds no UNet (model.diffusion_model.*): not an SDXL single file")
    for model in args.models:
        if not Path(model).is_file():
            raise UserInputError(f"--models: no such file: {model}")
    out = Path(args.save_to)
    if out.suffix.lower() != ".safetensors":
        raise UserInputError(f"--save_to: {out} must end in .safetensors")
    if out.exists() and out.resolve() in {base.resolve(), *(Path(m).resolve() for m in args.models)}:
        raise UserInputError(f"--save_to: {out} is one of the inputs; write to a new file")
    ratios = [1.0] * len(args.models) if args.ratios is None else list(args.ratios)
    if len(ratios) != len(args.models):
        raise UserInputError(f"--ratios: {len(ratios)} values for {len(args.models)} --models; give one per model")
    return ratios


def merge_metadata(
    base: Path, models: Sequence[Path], ratios: Sequence[float], precision: str, save_precision: str | None
) -> dict[str, str]:
    """The output's metadata: what was merged (modelspec.merged_from as sd-scripts writes it, plus the details)."""
    from library.files.lora_merge import read_safetensors_header

    _, base_metadata, _ = read_safetensors_header(base)
    loras = []
    for path, ratio in zip(models, ratios):
        _, lora_metadata, _ = read_safetensors_header(path)
        loras.append(
            {
                "file": path.name,
                "ratio": ratio,
                "title": lora_metadata.get("modelspec.title"),
                "sshs_model_hash": lora_metadata.get("sshs_model_hash"),
                "ss_sd_model_name": lora_metadata.get("ss_sd_model_name"),
            }
        )
    titles = [base_metadata.get("modelspec.title") or base.stem]
    titles += [lora["title"] or path.stem for lora, path in zip(loras, models)]
    metadata = dict(base_metadata)
    metadata.update(
        {
            "format": "pt",
            "modelspec.merged_from": ", ".join(titles),
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "merge_lora": json.dumps(
                {"base": base.name, "loras": loras, "precision": precision, "save_precision": save_precision}
            ),
        }
    )
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    """Merge; returns the exit code (2 and one line on stderr for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        ratios = _check_inputs(args)
        from library.files.lora_merge import LoRAToMerge, merge_loras_into_single_file

        models = [Path(m) for m in args.models]
        metadata = (
            None
            if args.no_metadata
            else merge_metadata(Path(args.sd_model), models, ratios, args.precision, args.save_precision)
        )
        started = time.perf_counter()
        report = merge_loras_into_single_file(
            args.sd_model,
            [LoRAToMerge(path, ratio) for path, ratio in zip(models, ratios)],
            args.save_to,
            merge_dtype=_dtype(args.precision),
            save_dtype=_dtype(args.save_precision),
            metadata=metadata,
        )
    except RunStopped as error:  # bad input (2), or a merge that would write NaN/inf (3)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    for path, ratio, count in zip(models, ratios, report.modules):
        print(f"merged {path.name} x {ratio:g}: {count} modules")
    print(f"saved {args.save_to} ({len(report.changed_keys)} tensors changed, {time.perf_counter() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
