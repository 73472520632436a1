#!/usr/bin/env python
"""Train an SDXL LoRA with LoRA+ from sd-scripts' command line.

    accelerate launch train_network.py --pretrained_model_name_or_path X.safetensors \
        --train_data_dir D --output_dir OUT --network_module networks.lora --loraplus_lr_ratio 16 ...

or with the same arguments in a TOML file: `train_network.py --config_file train.toml [flags that win]`.

Exit codes: 0 done, 2 bad input, 3 training diverged (NaN/inf), 69 another process of the run was lost,
75 the output is in use by another run, 130 Ctrl-C, 143 SIGTERM (see library.errors).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.config.cli import build_parser, resume_command
from library.config.config_file import parse_args, write_config
from library.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, RunStopped
from library.train import allocator
from library.train.interrupts import TrainingInterrupted, signal_name, sigterm_interrupts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; returns the process exit code (one `error:` line on stderr for a refused or stopped run).

    Ctrl-C or SIGTERM during training prints what was saved and the command that continues, then raises the
    `TrainingInterrupted` on (a KeyboardInterrupt), so an in-process caller stops as it would on Ctrl-C; `run`
    turns it into the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    allocator.set_malloc_thresholds()  # before torch allocates: freed weight up-casts go back to the OS
    parser = build_parser()
    try:
        args = parse_args(parser, argv)  # the command line over --config_file's values
    except SystemExit as exit_:  # --help, or a flag argparse could not parse (already reported in one line)
        return int(exit_.code or 0)
    except RunStopped as error:
        return _report(error)
    try:
        if args.output_config:  # write the effective arguments and stop: nothing is loaded
            print(f"arguments written to {write_config(parser, args)}")
            return 0
        from library.config.build import config_from_args

        cfg = config_from_args(args)
        from library.train.trainer import train

        result = train(cfg)
    except RunStopped as error:
        return _report(error)
    except TrainingInterrupted as stop:  # what was saved, and how to go on
        for line in stop.report_lines():
            print(line, file=sys.stderr)
        if stop.state_path is not None and stop.is_main_process and stop.num_processes > 1:
            script = resume_command(argv, stop.state_path, program="train_network.py")
            print(
                f"state saved to {stop.state_path}; continue with {stop.num_processes} processes, launched as this "
                f"run was (accelerate launch, torchrun), with:\n  {script}",
                file=sys.stderr,
            )
        elif stop.state_path is not None and stop.is_main_process:
            print(
                f"state saved to {stop.state_path}; continue with:\n  {resume_command(argv, stop.state_path)}",
                file=sys.stderr,
            )
        raise
    if result.is_main_process:
        print(f"LoRA saved to {result.final_path}")
        if result.report_page is not None:  # last: what to open next
            print(f"report: {result.report_page}")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """The script's exit code: `main`'s, or for an interrupt 130 (Ctrl-C) / 143 (SIGTERM) without a traceback
    (what was saved is already printed). SIGTERM takes Ctrl-C's path from here on, so one that arrives while the
    libraries load still prints its line instead of killing the process silently."""
    with sigterm_interrupts():
        try:
            return main(argv)
        except KeyboardInterrupt as interrupt:
            code = getattr(interrupt, "exit_code", None)
            if code is None:  # before the trainer started (imports, parsing): nothing to save
                name = signal_name(interrupt)
                print(f"interrupted ({name}) before training started: nothing was saved", file=sys.stderr)
                return EXIT_TERMINATED if name == "SIGTERM" else EXIT_INTERRUPTED
            return code


def _report(error: RunStopped) -> int:
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(run())
