"""bench/data_throughput.py runs end to end at the smallest settings and prints its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_runs_and_prints_the_table(capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        ["--count", "2", "--side", "96", "--resolution", "64", "--steps", "1", "--epochs", "1", "--workers", "0", "2"]
    )
    out = capsys.readouterr().out
    assert "uncached (decode+resize)" in out and "cached latents" in out
    assert "cached / uncached data samples/s, 0 workers:" in out and "loader wait" in out
