#!/usr/bin/env python
"""Show what a LoRA file holds: modules per component and UNet block, ranks, alphas, training metadata, LoRA+.

    python tools/lora_info.py FILE.safetensors [--json]

Reads the header and the alpha tensors only (never the weights). Works on files without metadata too.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

from library.errors import UserInputError  # noqa: E402

COMPONENTS = ("te1", "te2", "unet")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_BLOCK = re.compile(r"lora_unet_(input_blocks|output_blocks|down_blocks|up_blocks)_(\d+)_")
_BLOCK_ORDER = {
    "input_blocks": 0,
    "down_blocks": 0,
    "middle_block": 1,
    "mid_block": 1,
    "output_blocks": 2,
    "up_blocks": 2,
    "other": 3,
}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

# The ss_* keys worth a glance, in display order (the JSON keeps their raw string values).
HIGHLIGHT_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_network_dropout",
    "ss_loraplus_lr_ratio",
    "ss_loraplus_unet_lr_ratio",
    "ss_loraplus_text_encoder_lr_ratio",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_base_model_version",
    "ss_steps",
    "ss_epoch",
    "ss_max_train_steps",
    "ss_num_epochs",
    "ss_resolution",
    "ss_num_train_images",
    "ss_optimizer",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_lr_scheduler",
    "ss_lr_warmup_steps",
    "ss_mixed_precision",
    "ss_seed",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_output_name",
    "modelspec.title",
    "modelspec.architecture",
    "sshs_model_hash",
)


# --- Reading -------------------------------------------------------------------------------------------------------
def _component(name: str) -> str:
    for component in COMPONENTS:
        if name.startswith(f"lora_{component}_"):
            return component
    return "other"


def _unet_block(name: str) -> str:
    """``input_blocks 4`` / ``middle_block`` / ``output_blocks 2`` (diffusers names: ``down_blocks 1``...)."""
    if m := _BLOCK.match(name):
        return f"{m.group(1)} {m.group(2)}"
    for block in ("middle_block", "mid_block"):
        if name.startswith(f"lora_unet_{block}_"):
            return block
    return "other"


def _block_sort_key(block: str) -> tuple[int, int, str]:
    kind, _, number = block.partition(" ")
    return _BLOCK_ORDER.get(kind, 3), int(number) if number else 0, kind


def _float(value: str | None) -> float | None:
    if value is None or value in ("", "None", "null"):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _loraplus(
    metadata: Mapping[str, str],
    network_args: Mapping[str, Any] | None,
    param_groups: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """Whether LoRA+ was on and its ratios: from the param groups when recorded, else from the ratios.

    The trainer's own keys (``ss_loraplus_unet_lr_ratio``...) hold the effective ratios; sd-scripts' files only
    have ``ss_network_args``, where the specific ratio wins over ``loraplus_lr_ratio``.
    """
    args = network_args or {}
    general = _float(metadata.get("ss_loraplus_lr_ratio")) or _float(args.get("loraplus_lr_ratio"))
    unet = _float(metadata.get("ss_loraplus_unet_lr_ratio")) or _float(args.get("loraplus_unet_lr_ratio")) or general
    text_encoder = (
        _float(metadata.get("ss_loraplus_text_encoder_lr_ratio"))
        or _float(args.get("loraplus_text_encoder_lr_ratio"))
        or general
    )
    if param_groups:
        enabled: bool | None = any(bool(g.get("plus")) for g in param_groups)
    elif unet is not None or text_encoder is not None:
        enabled = True
    elif network_args is not None or "ss_network_module" in metadata:
        enabled = False
    else:
        enabled = None  # no training metadata: unknown
    return {"enabled": enabled, "unet_ratio": unet, "text_encoder_ratio": text_encoder}


def describe_lora(path: str | Path) -> dict[str, Any]:
    """The facts about a LoRA file as a JSON-ready dict (see the module docstring)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no such file: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            dtypes = sorted({_DTYPE_NAMES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()) for k in shapes})
            alphas = {
                key[: -len(".alpha")]: float(f.get_tensor(key).float().item())
                for key in shapes
                if key.endswith(".alpha")
            }
    except Exception as error:  # safetensors raises its own error types for a broken header
        raise UserInputError(f"cannot read {path}: {error}") from None

    downs = {key[: -len(".lora_down.weight")]: shape for key, shape in shapes.items() if key.endswith(_SUFFIXES[0])}
    other = sorted(key for key in shapes if not key.endswith(_SUFFIXES))
    components: dict[str, dict[str, Any]] = {}
    blocks: dict[str, int] = {}
    all_dims, all_alphas, conv_dims, conv_alphas, conv_count = set(), set(), set(), set(), 0
    for name, shape in sorted(downs.items()):
        dim = shape[0]
        alpha = alphas.get(name) or float(dim)  # absent or 0: alpha = rank
        is_conv = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        entry = components.setdefault(
            _component(name), {"modules": 0, "dims": set(), "alphas": set(), "conv_modules": 0}
        )
        entry["modules"] += 1
        entry["dims"].add(dim)
        entry["alphas"].add(alpha)
        entry["conv_modules"] += is_conv
        all_dims.add(dim)
        all_alphas.add(alpha)
        if is_conv:
            conv_count += 1
            conv_dims.add(dim)
            conv_alphas.add(alpha)
        if _component(name) == "unet":
            block = _unet_block(name)
            blocks[block] = blocks.get(block, 0) + 1

    network_args = _json_or_none(metadata.get("ss_network_args"))
    param_groups = _json_or_none(metadata.get("ss_lr_param_groups"))
    order = {c: i for i, c in enumerate(COMPONENTS + ("other",))}
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "tensors": len(shapes),
        "dtypes": dtypes,
        "modules": len(downs),
        "components": {
            c: {**e, "dims": sorted(e["dims"]), "alphas": sorted(e["alphas"])}
            for c, e in sorted(components.items(), key=lambda item: order[item[0]])
        },
        "unet_blocks": {b: blocks[b] for b in sorted(blocks, key=_block_sort_key)},
        "dims": sorted(all_dims),
        "alphas": sorted(all_alphas),
        "conv": {"modules": conv_count, "dims": sorted(conv_dims), "alphas": sorted(conv_alphas)},
        "other_tensors": other,
        "has_metadata": bool(metadata),
        "metadata": {k: metadata[k] for k in HIGHLIGHT_KEYS if k in metadata},
        "network_args": network_args,
        "loraplus": _loraplus(metadata, network_args, param_groups),
        "param_groups": param_groups,
    }


# --- Formatting ----------------------------------------------------------------------------------------------------
def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values) or "-"


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def _timestamp(value: str | None) -> str | None:
    seconds = _float(value)
    return None if seconds is None else datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def _training_lines(meta: Mapping[str, str], network_args: Any) -> list[str]:
    """The training metadata as label / value rows; values absent or "None" are left out."""

    def f(key: str, template: str = "{}") -> str | None:
        value = meta.get(key)
        return None if value in (None, "", "None") else template.format(value)

    epochs = f("ss_num_epochs", ", {} epochs")
    args = f"args {json.dumps(network_args)}" if network_args else f("ss_network_args", "args {}")
    finished = _timestamp(meta.get("ss_training_finished_at"))
    rows = [
        ("network", f("ss_network_module"), f("ss_network_dim", "dim {}"), f("ss_network_alpha", "alpha {}"), args),
        ("base model", f("ss_sd_model_name"), f("ss_sd_model_hash", "hash {}"), f("ss_base_model_version")),
        (
            "progress",
            f("ss_steps", "{} steps"),
            f("ss_epoch", "epoch {}"),
            f("ss_max_train_steps", "(of {} steps" + (epochs or "") + ")"),
        ),
        ("data", f("ss_resolution", "resolution {}"), f("ss_num_train_images", "{} images"), f("ss_seed", "seed {}")),
        ("optimizer", f("ss_optimizer")),
        (
            "learning rate",
            f("ss_learning_rate", "lr {}"),
            f("ss_unet_lr", "unet {}"),
            f("ss_text_encoder_lr", "text encoder {}"),
        ),
        ("scheduler", f("ss_lr_scheduler"), f("ss_lr_warmup_steps", "warmup {}")),
        ("precision", f("ss_mixed_precision", "mixed {}")),
        ("trained", _timestamp(meta.get("ss_training_started_at")), finished and f"-> {finished}"),
        ("title", f("modelspec.title")),
    ]
    kept = [(label, "  ".join(p for p in parts if p)) for label, *parts in rows]
    kept = [(label, text) for label, text in kept if text]
    return _table(kept) if kept else []


def format_lora_info(info: Mapping[str, Any]) -> str:
    """The report ``describe_lora``'s facts make for a terminal."""
    size = info["size_bytes"] / 2**20
    lines = [f"{info['file']}: {size:.1f} MiB, {info['tensors']} tensors ({', '.join(info['dtypes']) or '-'})"]
    comps = info["components"]
    lines.append(
        f"modules: {info['modules']}"
        + (" (" + ", ".join(f"{c} {e['modules']}" for c, e in comps.items()) + ")" if comps else "")
    )
    if comps:
        rows = [("component", "modules", "dims", "alphas", "conv 3x3")]
        rows += [
            (c, str(e["modules"]), _numbers(e["dims"]), _numbers(e["alphas"]), str(e["conv_modules"] or "-"))
            for c, e in comps.items()
        ]
        lines += _table(rows, right=(1,))
    conv = info["conv"]
    lines.append(
        f"conv LoRA (3x3): {conv['modules']} modules, dim {_numbers(conv['dims'])}, alpha {_numbers(conv['alphas'])}"
        if conv["modules"]
        else "conv LoRA (3x3): none"
    )
    if info["unet_blocks"]:
        lines.append("UNet modules by block:")
        by_kind: dict[str, list[str]] = {}
        for block, count in info["unet_blocks"].items():
            kind, _, number = block.partition(" ")
            by_kind.setdefault(kind, []).append(f"{number}: {count}" if number else str(count))
        lines += _table([(f"{kind}:", ", ".join(cells)) for kind, cells in by_kind.items()])
    if info["other_tensors"]:
        shown = ", ".join(info["other_tensors"][:3])
        lines.append(f"not plain LoRA tensors: {len(info['other_tensors'])} (e.g. {shown})")

    plus = info["loraplus"]
    if plus["enabled"] is None:
        lines.append("LoRA+: unknown (no training metadata)")
    elif plus["enabled"]:
        ratios = [
            f"{label} lr x{ratio:g}"
            for label, ratio in (("unet", plus["unet_ratio"]), ("text encoder", plus["text_encoder_ratio"]))
            if ratio is not None
        ]
        lines.append("LoRA+: on" + (f" ({', '.join(ratios)})" if ratios else ""))
    else:
        lines.append("LoRA+: off")

    if info["has_metadata"]:
        training = _training_lines(info["metadata"], info["network_args"])
        if training:
            lines.append("training:")
            lines += training
    else:
        lines.append("metadata: none")

    if info["param_groups"]:
        lines.append("parameter groups:")
        rows = [("component", "group", "tensors", "parameters", "lr")]
        rows += [
            (
                str(g.get("component", "?")),
                "plus (B)" if g.get("plus") else "base",
                str(g.get("tensors", "?")),
                f"{g['parameters']:,}" if isinstance(g.get("parameters"), int) else "?",
                f"{g['lr']:.3g}" if isinstance(g.get("lr"), (int, float)) else "?",
            )
            for g in info["param_groups"]
        ]
        lines += _table(rows, right=(2, 3))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora_info.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="LoRA file (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    args = parser.parse_args(argv)
    try:
        info = describe_lora(args.file)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_lora_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
