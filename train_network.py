#!/usr/bin/env python
"""Train an SDXL LoRA with LoRA+ from sd-scripts' command line.

    accelerate launch train_network.py --pretrained_model_name_or_path X.safetensors \
        --train_data_dir D --output_dir OUT --network_module networks.lora --loraplus_lr_ratio 16 ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import build_parser
from library.errors import UserInputError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (2 and one line on stderr for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a flag argparse could not parse (already reported in one line)
        return int(exit_.code or 0)
    try:
        from library.config import config_from_args

        cfg = config_from_args(args)
        from library.trainer import train

        result = train(cfg)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.is_main_process:
        print(f"LoRA saved to {result.final_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
