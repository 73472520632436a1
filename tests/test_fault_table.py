"""bench/fault_table.py (its harness and catalogue) keeps its word: a few cheap faults run through its own functions
give the rows the table would print (exit 2, one error line, no traceback, earlier files unchanged), and a fault
that changes an earlier file or prints a traceback fails its row."""

from __future__ import annotations

import pytest

from bench import fault_harness as ft
from bench.fault_catalogue import FAULTS
from tools.make_demo_dataset import make_demo_dataset

CHEAP = "^(steps0|output_is_file|toml_config_key|missing_resume)$"


@pytest.fixture
def workspace(tiny_sdxl, tmp_path) -> ft.Workspace:
    """The tiny model, a data set and stand-ins for the earlier run's files (the cheap faults stop before any of
    them is read, so their bytes only need to stay the same)."""
    data = tmp_path / "data"
    make_demo_dataset(data, count=2, min_side=64, max_side=64)
    out = tmp_path / "earlier"
    (out / "run-state").mkdir(parents=True)
    (out / "run.safetensors").write_bytes(b"earlier LoRA")
    (out / "run-state" / "optimizer.bin").write_bytes(b"earlier optimizer")
    (data / "1_toy" / "000_te_outputs.npz").write_bytes(b"earlier cache")
    return ft.Workspace(tmp_path, tiny_sdxl.single_file, tiny_sdxl.diffusers_dir, data, out)


@pytest.mark.slow
def test_cheap_faults_give_one_error_line_and_keep_every_earlier_file(workspace):
    faults = ft.select(FAULTS, CHEAP)
    assert [f.key for f in faults] == ["steps0", "output_is_file", "toml_config_key", "missing_resume"]
    rows, shared_intact = ft.run_matrix(workspace, faults)
    assert shared_intact
    by_key = {row.key: row for row in rows}
    for row in rows:
        assert (row.exit, row.expected, row.traceback, row.files, row.ok) == (2, 2, False, "unchanged", True), row
    assert by_key["steps0"].line == "error: --max_train_steps 0 trains nothing: give 1 or more (or --max_train_epochs)"
    assert by_key["output_is_file"].line.endswith("is a file, not a folder: give a folder (it is created when missing)")
    assert by_key["toml_config_key"].line.endswith("unknown key 'learning_rat' (did you mean 'learning_rate'?)")
    assert by_key["missing_resume"].line == "error: --resume: no such state folder: out/no_such-state"
    table = ft.markdown(rows)
    assert table.count("\n") == 1 + len(rows) and "| 6 | empty run | --max_train_steps 0 | 2 | error:" in table


def _fake_fault(act) -> ft.Fault:
    return ft.Fault(1, "fake", "test", "a fault made up here", lambda case: lambda: act(case))


def test_a_changed_or_removed_earlier_file_fails_the_row(workspace):
    def act(case: ft.Case) -> ft.Outcome:
        case.lora.write_bytes(b"replaced")
        (case.state / "optimizer.bin").unlink()
        (case.out / "new.json").write_text("{}")
        return ft.Outcome(2, "error: something\n", "")

    row = ft.run_fault(workspace, _fake_fault(act))
    assert not row.ok and not row.files_ok
    assert row.files == "CHANGED: out/run.safetensors; REMOVED: out/run-state/optimizer.bin; new: out/new.json"


def test_a_traceback_or_another_exit_code_fails_the_row(workspace):
    traceback = ft.Outcome(2, "Traceback (most recent call last):\n  File x\nValueError: y\n", "")
    row = ft.run_fault(workspace, _fake_fault(lambda case: traceback))
    assert (row.traceback, row.files, row.ok, row.line) == (True, "unchanged", False, "ValueError: y")
    row = ft.run_fault(workspace, _fake_fault(lambda case: ft.Outcome(0, "", "done\n")))
    assert (row.traceback, row.ok) == (False, False) and "**0** (expected 2)" in ft.markdown([row])


def test_the_line_shown_is_the_trainers_last_own_line():
    stderr = (
        "steps: 50%|##| 1/2\rsteps: 100%|##| 2/2\nwarning: a\ninterrupted (SIGTERM) after step 1: LoRA saved\n"
        "state saved to X; continue with:\n  python train_network.py --resume X\n"
    )
    assert ft.message_line(ft.Outcome(143, stderr, "")) == "interrupted (SIGTERM) after step 1: LoRA saved"
    assert (
        ft.message_line(ft.Outcome(0, "steps: 100%|##| 2/2\n", "note: took over\nLoRA saved to y\n"))
        == "note: took over"
    )
    assert ft.message_line(ft.Outcome(-15, "", "")) == ""


def test_changes_the_fault_allows_are_listed_apart():
    before = {"data/a_sdxl.npz": "1", "data/b_sdxl.npz": "2", "out/run.safetensors": "3"}
    after = {"data/a_sdxl.npz": "9", "out/run.safetensors": "3", "out/x/1": "4", "out/x/2": "4", "out/x/3": "4"}
    changes = ft.compare(before, after, ("data/*_sdxl.npz",))
    assert (
        changes.ok
        and changes.describe()
        == "unchanged; changed as expected: data/a_sdxl.npz, data/b_sdxl.npz; new: out/x/ (3 files)"
    )


def test_every_fault_has_a_unique_key_and_there_are_enough():
    keys = [f.key for f in FAULTS]
    assert len(keys) == len(set(keys)) >= 35
    assert [f.number for f in FAULTS] == list(range(1, len(FAULTS) + 1))
    assert {f.group for f in FAULTS} >= {
        "NaN/inf",
        "empty run",
        "lock",
        "signal",
        "output folder",
        "full disk",
        "damaged model",
        "damaged --network_weights",
        "damaged --resume state",
        "damaged cache",
        "damaged TOML",
        "bad flag",
        "missing path",
        "broken image",
    }


def test_a_fault_the_harness_cannot_set_up_fails_its_row_and_the_others_run(workspace):
    def broken(case: ft.Case):
        raise FileNotFoundError("no such fixture")

    row = ft.run_fault(workspace, ft.Fault(1, "broken", "test", "a set-up that fails", broken))
    assert (row.ok, row.exit, row.line) == (False, None, "harness error: FileNotFoundError('no such fixture')")
