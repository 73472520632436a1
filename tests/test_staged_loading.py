"""Staged loading (issue 15): the VAE and text encoders whose outputs are cached are loaded, used and released before
the UNet loads, so the models are never resident all at once; and the peak RAM of each phase in the run report.

- the loader loads components in stages into the same models, each tensor read once over all stages, and checks
  every component against the file on its first call;
- the stages per flag combination, and the components resident at each cache step and when the network is built,
  recorded from a real set-up of the tiny model;
- a staged run trains the same LoRA as one that loads everything at once (the RNG sees the same draws);
- the memory phases: each phase's own peak (Linux resets the mark), or the peak so far elsewhere.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import library.train.setup_parts as setup_parts
import library.train.trainer as trainer
from library.config.build import config_from_args
from library.config.cli import build_parser
from library.errors import UserInputError
from library.files.weight_files import TensorReader
from library.model.base_models import LoadingStages, loading_stages
from library.model.loading import COMPONENTS, load_sdxl
from library.train import memory_phases
from library.train.memory_phases import MemoryPhases
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

TES = ("text_encoder1", "text_encoder2")
MB = 2**20


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """Every (file, tensor, rows) the loader reads, counted."""
    counted: Counter = Counter()
    real = TensorReader.read

    def read(self, key, rows=None, **kwargs):
        counted[(str(self.path), key, rows)] += 1
        return real(self, key, rows, **kwargs)

    monkeypatch.setattr(TensorReader, "read", read)
    return counted


def resident(models) -> set[str]:
    return {name for name in COMPONENTS if getattr(models, name) is not None}


# --- The loader in stages ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single_file", "diffusers_dir"])
def test_staged_load_equals_one_load_and_reads_each_tensor_once(tiny_sdxl, tiny_models, reads, layout):
    path = getattr(tiny_sdxl, layout)
    models = load_sdxl(path, components=("vae",))
    assert resident(models) == {"vae"}
    assert set(models.pending) == {"unet", *TES}  # checked, on the meta device, not loaded
    assert all(p.is_meta for m in models.pending.values() for p in m.parameters())
    vae_reads = sum(reads.values())
    assert load_sdxl(path, components=TES, into=models) is models
    assert resident(models) == {"vae", *TES}
    load_sdxl(path, components=("unet",), into=models)
    assert resident(models) == set(COMPONENTS) and models.pending == {}
    staged = Counter(reads)
    reads.clear()
    load_sdxl(path)  # all at once: the same reads
    assert staged == reads and max(staged.values()) == 1 and 0 < vae_reads < len(staged) / 4
    for name in COMPONENTS:
        expected, loaded = getattr(tiny_models, name).state_dict(), getattr(models, name).state_dict()
        assert list(loaded) == list(expected), name
        assert all(torch.equal(loaded[key], tensor) for key, tensor in expected.items()), name
        assert not getattr(models, name).training


def test_the_first_stage_checks_every_component_before_reading(tiny_sdxl, tmp_path, reads):
    tensors = load_file(tiny_sdxl.single_file)
    key = "model.diffusion_model.output_blocks.2.2.conv.weight"
    del tensors[key]
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path)
    with pytest.raises(UserInputError, match=rf"\(unet: no tensor {key}\)"):
        load_sdxl(path, config_dir=tiny_sdxl.diffusers_dir, components=("vae",))
    assert sum(reads.values()) == 0
    models = load_sdxl(tiny_sdxl.single_file, components=())  # a check alone reads nothing
    assert resident(models) == set() and set(models.pending) == set(COMPONENTS) and sum(reads.values()) == 0


def test_staged_load_refuses_what_would_mix_models(tiny_sdxl):
    models = load_sdxl(tiny_sdxl.single_file, components=("vae",))
    with pytest.raises(ValueError, match=r"\['vae'\] already loaded"):
        load_sdxl(tiny_sdxl.single_file, components=("vae", "unet"), into=models)
    with pytest.raises(ValueError, match="into: models of"):
        load_sdxl(tiny_sdxl.diffusers_dir, components=("unet",), into=models)
    with pytest.raises(ValueError, match="unknown"):
        load_sdxl(tiny_sdxl.single_file, components=("refiner",))
    models.vae = None  # released: a later stage may load it again, from a fresh empty model
    load_sdxl(tiny_sdxl.single_file, components=("vae",), into=models)
    assert resident(models) == {"vae"} and not models.vae.encoder.conv_in.weight.is_meta


@pytest.mark.parametrize(
    ("latents", "text", "expected"),
    [
        (False, False, ((), (), COMPONENTS)),
        (True, False, (("vae",), (), ("unet", *TES))),
        (False, True, ((), TES, ("unet", "vae"))),
        (True, True, (("vae",), TES, ("unet",))),
    ],
)
def test_loading_stages_per_flag_combination(latents, text, expected):
    stages = loading_stages(cache_latents=latents, cache_text_encoder_outputs=text)
    assert stages == LoadingStages(*expected)
    assert sorted(sum(expected, ())) == sorted(COMPONENTS)  # each component in exactly one stage


# --- What is resident when, in a real set-up -------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("staged_data")
    make_demo_dataset(root, count=2, min_side=64, max_side=64, repeats=1, name="toy", seed=3)
    return root


class _SetUpDone(Exception):
    pass


CACHED_BOTH = ("--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only")
ALL = set(COMPONENTS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            CACHED_BOTH,
            [("load", {"vae"}), ("latents", {"vae"}), ("load", {*TES}), ("text", {*TES}), ("load", {"unet"})]
            + [("network", {"unet"})],
        ),
        (
            ("--cache_latents",),
            [("load", {"vae"}), ("latents", {"vae"}), ("load", {"unet", *TES}), ("network", {"unet", *TES})],
        ),
        (
            ("--cache_text_encoder_outputs", "--network_train_unet_only"),
            [("load", set()), ("load", {*TES}), ("text", {*TES}), ("load", {"unet", "vae"})]
            + [("network", {"unet", "vae"})],
        ),
        (  # samples need every model later: nothing is freed, the UNet still loads after the caching
            (*CACHED_BOTH, "--sample_every_n_steps", "1", "--sample_prompts", "PROMPTS"),
            [("load", {"vae"}), ("latents", {"vae"}), ("load", {"vae", *TES}), ("text", {"vae", *TES})]
            + [("load", ALL), ("network", ALL)],
        ),
    ],
    ids=["both cached", "latents cached", "text cached", "both cached, samples"],
)
def test_components_resident_at_each_cache_step(tiny_sdxl, data, tmp_path, monkeypatch, flags, expected):
    """Events in order: ("load", resident after it), the cache steps and the network's creation with what is
    resident then. On a GPU this is what the device holds: the caching never sees the UNet."""
    events: list[tuple[str, set[str]]] = []
    holder = {}

    def load(*args, **kwargs):
        holder["models"] = setup_parts_load(*args, **kwargs)
        events.append(("load", resident(holder["models"])))
        return holder["models"]

    def recorded(name, real):
        def call(*args, **kwargs):
            events.append((name, resident(holder["models"])))
            return real(*args, **kwargs)

        return call

    def stop(*args, **kwargs):
        events.append(("network", resident(holder["models"])))
        raise _SetUpDone

    setup_parts_load = setup_parts.load_sdxl
    monkeypatch.setattr(setup_parts, "load_sdxl", load)
    monkeypatch.setattr(setup_parts, "cache_latents", recorded("latents", setup_parts.cache_latents))
    monkeypatch.setattr(
        setup_parts, "cache_text_encoder_outputs", recorded("text", setup_parts.cache_text_encoder_outputs)
    )
    monkeypatch.setattr(trainer, "setup_optimizer", stop)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 1\n")
    argv = tiny_train_argv(tiny_sdxl.single_file, data, tmp_path / "out", "--max_train_steps", "1", *flags)
    argv = [str(prompts) if arg == "PROMPTS" else arg for arg in argv]
    with pytest.raises(_SetUpDone):
        trainer.train(config_from_args(build_parser().parse_args(argv)))
    assert events == expected


# --- Same LoRA, and the report's phases --------------------------------------------------------------------------
def _train(model: Path, data: Path, out: Path) -> dict[str, torch.Tensor]:
    argv = tiny_train_argv(model, data, out, "--max_train_steps", "1", "--network_dim", "4", *CACHED_BOTH)
    argv += ["--loraplus_lr_ratio", "16", "--learning_rate", "1e-3", "--output_name", "run"]
    result = trainer.train(config_from_args(build_parser().parse_args(argv)))
    return load_file(result.final_path)


@pytest.mark.slow
def test_a_staged_run_trains_the_same_lora_as_loading_all_at_once(tiny_sdxl, data, tmp_path, monkeypatch):
    staged = _train(tiny_sdxl.single_file, data, tmp_path / "staged")
    report = json.loads((tmp_path / "staged" / "run_report.json").read_text())
    monkeypatch.setattr(trainer, "loading_stages", lambda **_: LoadingStages(COMPONENTS, (), ()))
    at_once = _train(tiny_sdxl.single_file, data, tmp_path / "at_once")
    assert list(staged) == list(at_once)
    assert all(torch.equal(staged[key], at_once[key]) for key in staged)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in staged.items() if "lora_up" in k)  # it trained

    phases = report["memory_phases"]
    assert [(p["phase"], p["what"]) for p in phases["phases"]] == [
        ("start", ""),
        ("load", "VAE"),
        ("cache", "latents"),
        ("load", "text encoder 1, text encoder 2"),
        ("cache", "text-encoder outputs"),
        ("load", "UNet"),
        ("set-up", ""),
        ("train", ""),
    ]
    peaks = [p["peak_rss_bytes"] for p in phases["phases"]]
    assert min(peaks) > 100 * MB and report["peak_memory"]["rss_bytes"] >= max(peaks)
    assert phases["peak_rss_bytes"]["load"] == max(peaks[1], peaks[3], peaks[5])
    page = (tmp_path / "staged" / "run_report.html").read_text()
    assert "peak RAM: load (UNet)" in page and "peak RAM: cache (latents)" in page


# --- Memory phases -------------------------------------------------------------------------------------------------
def _touch(megabytes: int) -> None:
    block = torch.ones(megabytes * MB // 4)  # every page written: resident
    del block


@pytest.mark.skipif(not memory_phases.reset_peak_rss(), reason="the peak RSS cannot be reset here (Linux only)")
def test_each_phase_gets_its_own_peak_where_the_mark_resets():
    phases = MemoryPhases()
    phases.enter("load", "big")
    _touch(256)
    phases.enter("cache")
    _touch(16)
    phases.enter("train")
    report = phases.report()
    load, cache, train = (p["peak_rss_bytes"] for p in report["phases"])
    assert report["method"].startswith("per phase")
    assert load - cache > 200 * MB and abs(train - cache) < 64 * MB, (load, cache, train)
    assert phases.peak() == load == report["peak_rss_bytes"]["load"]


def test_phases_are_cumulative_where_the_mark_cannot_reset(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_phases, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    phases = MemoryPhases()
    phases.enter("load")
    _touch(64)
    phases.enter("cache")
    report = phases.report()
    assert report["method"].startswith("cumulative")
    assert [p["peak_rss_bytes"] for p in report["phases"]] == sorted(p["peak_rss_bytes"] for p in report["phases"])
    with pytest.raises(ValueError, match="unknown memory phase"):
        phases.enter("sampling")
