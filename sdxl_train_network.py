#!/usr/bin/env python
"""sd-scripts' SDXL entry point name: the same program as train_network.py."""

import sys

from train_network import main, run  # noqa: F401  (main: for in-process callers, as train_network.main)

if __name__ == "__main__":
    sys.exit(run())
