"""bench/loraplus_convergence.py's harness (not its science): the LoRA+ groups it trains with, a teacher the student
can learn, one validation batch for every run, the steps-to-reach arithmetic, and a JSON with every cell."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import loraplus_convergence as bench


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick harness on the cheapest width, in this process: (result, JSON on disk, output folder)."""
    out = tmp_path_factory.mktemp("convergence")
    argv = ["--quick", "--widths", "640", "--optimizers", "AdamW,Lion", "--ratios", "4", "--jobs", "1"]
    result = bench.main([*argv, "--out", str(out)])
    return result, json.loads((out / "loraplus_convergence.json").read_text()), out


@pytest.mark.slow
def test_b_matrices_learn_at_ratio_times_the_a_rate():
    task = bench.sdxl_transformer_task(640)
    network = bench.student_network(task.model, 0, 16.0, bench.QUICK)
    try:
        optimizer, group_lrs = bench.optimizer_for(network, "AdamW", 1e-3)
        assert group_lrs == {"unet": 1e-3, "unet plus": pytest.approx(1.6e-2)}
        ups = {id(m.lora_up.weight) for m in network.unet_loras}
        downs = {id(m.lora_down.weight) for m in network.unet_loras}
        a_group, b_group = optimizer.param_groups
        assert a_group["lr"] == 1e-3 and {id(p) for p in a_group["params"]} == downs
        assert b_group["lr"] == pytest.approx(16 * a_group["lr"]) and {id(p) for p in b_group["params"]} == ups
        assert len(ups) == 12  # proj_in/out, attn1/attn2 q k v out, ff in/out of SDXL's block
        assert network.unet_loras[0].lora_name.startswith("lora_unet_input_blocks_4_1_")
    finally:
        network.remove_from_model()
    plain = bench.student_network(task.model, 0, 1.0, bench.QUICK)
    try:
        assert bench.optimizer_for(plain, "Lion", 3e-4)[1] == {"unet": 3e-4}
    finally:
        plain.remove_from_model()


def test_steps_to_reach_interpolates_between_evaluations():
    steps, losses = [0, 10, 20, 30], [1.0, 0.6, 0.2, 0.1]
    assert bench.steps_to_reach(steps, losses, 0.4) == pytest.approx(15.0)
    assert bench.steps_to_reach(steps, losses, 0.6) == pytest.approx(10.0)
    assert bench.steps_to_reach(steps, losses, 1.5) == 0.0
    assert bench.steps_to_reach(steps, losses, 0.05) is None
    assert bench.steps_to_reach([0, 10, 20], [1.0, 0.5, 0.8], 0.5) == pytest.approx(10.0)


@pytest.mark.slow
def test_the_student_learns_the_hidden_change_at_ratio_1(quick):
    _, stored, _ = quick
    plain = [r for r in stored["runs"] if r["ratio"] == 1.0 and r["optimizer"] == "AdamW" and r["lr"] == 3e-3]
    assert plain and all(r["val_loss"][0] == 1.0 for r in plain)
    assert all(r["val_loss"][-1] < 0.95 for r in plain), [r["val_loss"] for r in plain]


@pytest.mark.slow
def test_every_run_of_a_seed_starts_from_the_same_validation_loss(quick):
    _, stored, _ = quick
    by_seed: dict[int, set[float]] = {}
    for run in stored["runs"]:
        by_seed.setdefault(run["seed"], set()).add(run["base_val_loss"])
        assert run["steps"][0] == 0 and run["val_loss"][0] == 1.0
    assert sorted(by_seed) == [0, 1]
    assert all(len(losses) == 1 for losses in by_seed.values()), by_seed
    assert len({next(iter(v)) for v in by_seed.values()}) == 2  # seeds differ: another hidden change


@pytest.mark.slow
def test_the_validation_batch_is_fixed():
    task = bench.sdxl_transformer_task(640)
    first, second = bench.fixed_val_batch(task, bench.QUICK), bench.fixed_val_batch(task, bench.QUICK)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["hidden"].shape == (2, 640, bench.TOKEN_GRID, bench.TOKEN_GRID)
    assert first["context"].shape == (2, bench.CONTEXT_TOKENS, 2048)


@pytest.mark.slow
def test_the_json_has_every_cell_with_every_seed(quick):
    result, stored, out = quick
    assert stored["summary"] == json.loads(json.dumps(result["summary"]))
    for optimizer in ("AdamW", "Lion"):
        for protocol in ("a", "b"):
            cells = stored["summary"]["640"][optimizer][protocol]
            assert sorted(cells) == ["1", "4"]
            for cell in cells.values():
                assert cell["seeds"] == [0, 1]
                assert cell["final_val_loss"]["n_total"] == 2
                assert math.isfinite(cell["final_val_loss"]["mean"]) or cell["diverged_seeds"]
    assert stored["summary"]["640"]["AdamW"]["a"]["1"]["lr"] == bench.USER_LR["AdamW"]
    assert (out / "loraplus_convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 640 | Lion | best lr |" in bench.markdown_tables(stored)
