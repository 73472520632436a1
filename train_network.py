#!/usr/bin/env python
"""Train an SDXL LoRA with LoRA+ from sd-scripts' command line.

    accelerate launch train_network.py --pretrained_model_name_or_path X.safetensors \
        --train_data_dir D --output_dir OUT --network_module networks.lora --loraplus_lr_ratio 16 ...

or with the same arguments in a TOML file: `train_network.py --config_file train.toml [flags that win]`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library import allocator
from library.cli import build_parser
from library.config_file import parse_args, write_config
from library.errors import UserInputError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (2 and one line on stderr for bad input)."""
    allocator.set_malloc_thresholds()  # before torch allocates: freed weight up-casts go back to the OS
    parser = build_parser()
    try:
        args = parse_args(parser, argv)  # the command line over --config_file's values
    except SystemExit as exit_:  # --help, or a flag argparse could not parse (already reported in one line)
        return int(exit_.code or 0)
    except UserInputError as error:
        return _report(error)
    try:
        if args.output_config:  # write the effective arguments and stop: nothing is loaded
            print(f"arguments written to {write_config(parser, args)}")
            return 0
        from library.config import config_from_args

        cfg = config_from_args(args)
        from library.trainer import TrainingInterrupted, train

        result = train(cfg)
    except UserInputError as error:
        return _report(error)
    except TrainingInterrupted as stop:  # Ctrl-C: what was saved, and how to go on
        if stop.lora_path is not None:
            print(f"interrupted after step {stop.step}: LoRA saved to {stop.lora_path}", file=sys.stderr)
        if stop.state_path is not None:
            print(f"state saved to {stop.state_path}; continue with --resume \"{stop.state_path}\"", file=sys.stderr)
        return 130
    if result.is_main_process:
        print(f"LoRA saved to {result.final_path}")
    return 0


def _report(error: UserInputError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
