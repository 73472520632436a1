"""Sample images during training: sd-scripts' prompt files and flags, when to sample, the sampler table, and
`sample_images` on the tiny SDXL (names, sizes, determinism, nothing of the training run changed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from library.config.cli import add_sampling_arguments
from library.errors import UserInputError
from library.train.sampling import (
    SAMPLERS,
    SamplePrompt,
    load_sample_prompts,
    make_sampling_config,
    sample_file_name,
    should_sample,
)

TXT = """# sample prompts
a cat sitting --n blurry, lowres --w 1024 --h 768 --d 42 --s 28 --l 6.5 --ss euler_a

a dog
"""
TOML = """
[prompt]
width = 1024
height = 768

[[prompt.subset]]
prompt = "a cat sitting"
negative_prompt = "blurry, lowres"
seed = 42
sample_steps = 28
scale = 6.5
sample_sampler = "euler_a"

[[prompt.subset]]
prompt = "a dog"
width = 512
height = 512
"""
JSON = [
    {
        "prompt": "a cat sitting",
        "negative_prompt": "blurry, lowres",
        "width": 1024,
        "height": 768,
        "seed": 42,
        "sample_steps": 28,
        "scale": 6.5,
        "sample_sampler": "euler_a",
    },
    {"prompt": "a dog"},
]
EXPECTED = [
    SamplePrompt(0, "a cat sitting", "blurry, lowres", 1024, 768, 42, 28, 6.5, "euler_a"),
    SamplePrompt(1, "a dog"),
]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- Prompt files --------------------------------------------------------------------------------------------------
def test_three_formats_read_the_same(tmp_path):
    assert load_sample_prompts(_write(tmp_path, "p.txt", TXT)) == EXPECTED
    assert load_sample_prompts(_write(tmp_path, "p.toml", TOML)) == EXPECTED
    assert load_sample_prompts(_write(tmp_path, "p.json", json.dumps(JSON))) == EXPECTED
    array = '[[prompt]]\nprompt = "a cat sitting --n x"\n[[prompt]]\nprompt = "a dog"\n'  # [[prompt]] works too
    assert [p.prompt for p in load_sample_prompts(_write(tmp_path, "a.toml", array))] == [
        "a cat sitting --n x",
        "a dog",
    ]
    assert load_sample_prompts(_write(tmp_path, "bom.txt", "\ufeff" + TXT)) == EXPECTED  # Notepad's BOM
    lines = json.dumps([TXT.splitlines()[1], "a dog"])  # a JSON list of .txt lines
    assert load_sample_prompts(_write(tmp_path, "l.json", lines)) == EXPECTED


def test_defaults_and_every_option(tmp_path):
    assert SamplePrompt(0, "x") == SamplePrompt(0, "x", "", 512, 512, None, 30, 7.5, None)  # sd-scripts' defaults
    text = (
        "a --W 1001 --H 30 --D 7 --S 0 --L 1 --SS DPMSolver++ --N  no  \n"  # options are case-insensitive
        "b --s 5000 --w 72 --h 0 --n first --n last -- --l 12\n"
    )
    first, second = load_sample_prompts(_write(tmp_path, "o.txt", text))
    assert first == SamplePrompt(0, "a", "no", 1000, 64, 7, 1, 1.0, "dpmsolver++")  # 8-multiples, >= 64; steps >= 1
    assert second == SamplePrompt(1, "b", "last", 72, 64, None, 1000, 12.0, None)  # steps <= 1000; last one wins
    assert (first.seed_for(100), second.seed_for(100)) == (7, 101)  # own seed, else seed_base + index


@pytest.mark.parametrize(
    "text, message",
    [
        ("a --x 1", r"line 4: unknown option --x"),
        ("a --sz 3", r"line 4: unknown option --sz \(did you mean --s\?\)"),
        ("a --w abc", r"line 4: width must be an integer, not 'abc'"),
        ("a --w 512 wide", r"line 4: width must be an integer"),
        ("a --l 1.2.3", r"line 4: scale must be a number"),
        ("a --d -1", r"line 4: seed must be a finite number, not negative"),
        ("a --ss euler_b", r"line 4: unknown sampler 'euler_b' \(did you mean euler_a\?\)"),
        ("a --n", r"line 4: --n needs a value"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "bad.txt", f"# comment\n\nfine --w 64\n{text}\n")
    with pytest.raises(UserInputError, match=rf"^--sample_prompts: .*bad\.txt, {message}"):
        load_sample_prompts(path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "k.json",
            '[{"prompt": "a"}, {"prompt": "b", "sample_step": 3}]',
            r"prompt 2: unknown key 'sample_step' \(did you mean "
            r"sample_steps\?\)",
        ),
        ("t.json", '[{"prompt": "a", "width": true}]', "prompt 1: width must be an integer, not True"),
        ("n.json", '[{"negative_prompt": "a"}]', "prompt 1: the table has no 'prompt'"),
        ("d.json", '{"prompt": "a"}', "must hold a JSON list"),
        ("s.json", '[{"prompt": "a",]', "is not valid JSON"),
        (
            "k.toml",
            '[prompt]\nsteps = 3\n[[prompt.subset]]\nprompt = "a"\n',
            r"\[\[prompt.subset\]\] entry 1: unknown key",
        ),
        ("m.toml", '[[subset]]\nprompt = "a"\n', r"needs a \[prompt\] table .*found subset"),
        ("s.toml", "prompt = [\n", "is not valid TOML"),
        ("e.txt", "# only a comment\n\n", "holds no prompts"),
        ("p.yaml", "prompt: a\n", "must be a .txt, .toml or .json file"),
    ],
)
def test_bad_files(tmp_path, name, text, message):
    with pytest.raises(UserInputError, match=message):
        load_sample_prompts(_write(tmp_path, name, text))
    with pytest.raises(UserInputError, match="no such file"):
        load_sample_prompts(tmp_path / "missing.txt")


# --- Flags and when to sample --------------------------------------------------------------------------------------
def test_flags_have_sd_scripts_names_and_defaults():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args([])
    assert vars(args) == {
        "sample_prompts": None,
        "sample_every_n_steps": None,
        "sample_every_n_epochs": None,
        "sample_at_first": False,
        "sample_sampler": "ddim",
    }
    args = parser.parse_args(
        [
            "--sample_prompts",
            "p.txt",
            "--sample_every_n_steps",
            "100",
            "--sample_every_n_epochs",
            "0",
            "--sample_at_first",
            "--sample_sampler",
            "k_euler_a",
        ]
    )
    assert (args.sample_every_n_steps, args.sample_every_n_epochs, args.sample_sampler) == (100, 0, "k_euler_a")
    for bad in (["--sample_sampler", "ddpm"], ["--sample_every_n_steps", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_should_sample_follows_sd_scripts():
    def due(step, epoch, steps=None, epochs=None, first=False):
        return should_sample(step, epoch, every_n_steps=steps, every_n_epochs=epochs, at_first=first)

    assert due(0, 0, first=True) and not due(0, 0, steps=1, epochs=1)  # before training: only --sample_at_first
    assert due(10, None, steps=5) and not due(11, None, steps=5)  # every N steps ...
    assert not due(10, 2, steps=5)  # ... never at an epoch's end
    assert due(10, 2, epochs=2) and not due(10, 3, epochs=2)  # every N epochs, at the epoch's end ...
    assert not due(10, None, steps=5, epochs=2)  # ... and then the step count is ignored
    assert not due(10, None) and not due(10, 2) and not due(10, None, steps=0, epochs=0)  # off


def test_sampling_config(tmp_path):
    prompts = _write(tmp_path, "p.txt", "a cat --ss k_dpm_2\n")
    config = make_sampling_config(prompts, sampler="euler_a", every_n_steps=0, every_n_epochs=2)
    assert config.prompts == (SamplePrompt(0, "a cat", sampler="k_dpm_2"),) and config.sampler == "euler_a"
    assert (config.every_n_steps, config.every_n_epochs, config.at_first) == (None, 2, False)
    assert config.due(7, 4) and not config.due(7, None)
    assert make_sampling_config(prompts) is None  # a prompt file without a trigger samples nothing, as sd-scripts
    assert make_sampling_config(None) is None
    with pytest.raises(UserInputError, match="--sample_every_n_steps needs --sample_prompts"):
        make_sampling_config(None, every_n_steps=10)
    with pytest.raises(UserInputError, match="no such file"):
        make_sampling_config(tmp_path / "missing.txt", at_first=True)


def test_prompt_module_is_torch_free():
    code = "import sys, library.train.sampling; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_file_names_are_sd_scripts():
    assert (
        sample_file_name("mylora", step=120, epoch=None, index=3, seed=42, timestamp="20260101120000")
        == "mylora_000120_03_20260101120000_42.png"
    )
    assert (
        sample_file_name("mylora", step=120, epoch=2, index=0, seed=7, timestamp="20260101120000")
        == "mylora_e000002_00_20260101120000_7.png"
    )
    assert sample_file_name(None, step=0, epoch=0, index=11, seed=1, timestamp="t") == "e000000_11_t_1.png"


# --- Schedulers ----------------------------------------------------------------------------------------------------
EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_builds_its_scheduler(tiny_models, name):
    from library.train.sampling import make_scheduler

    base = tiny_models.scheduler.config
    if name.endswith("lms") and importlib.util.find_spec("scipy") is None:
        with pytest.raises(UserInputError, match=f"sampler {name} needs scipy"):
            make_scheduler(name, base)
        return
    scheduler = make_scheduler(name, base)
    assert type(scheduler).__name__ == EXPECTED_CLASSES[name.removeprefix("k_")]
    assert scheduler.config.beta_schedule == base.beta_schedule and scheduler.config.prediction_type == "epsilon"
    if name.startswith("dpmsolver"):
        assert scheduler.config.algorithm_type == name
    scheduler.set_timesteps(3)


# --- Images on the tiny model ----------------------------------------------------------------------------------------
PROMPTS = [
    SamplePrompt(0, "a cat", width=64, height=64, steps=2),  # seed: seed_base + 0
    SamplePrompt(1, "a cat", width=64, height=64, steps=2, seed=7),  # differs from 0 only by the seed
    SamplePrompt(2, "a dog", width=64, height=64, steps=2, seed=7),  # differs from 1 only by the prompt
    SamplePrompt(3, "a dog", "blurry", width=96, height=64, steps=2, seed=7, scale=1.0, sampler="euler_a"),
]


def _flags(models, network):
    return [
        m.training
        for model in (models.unet, models.vae, models.text_encoder1, models.text_encoder2, network)
        for m in model.modules()
    ]


def _rng_state():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


@pytest.fixture(scope="module")
def sampled(tiny_models, tmp_path_factory):
    """Two runs: the four PROMPTS at step 12 (training-like flags on the models), then prompts 0 and 3 at
    the end of epoch 3. Returns (first paths, second paths, seen, flags and RNG state before/after)."""
    from library.train.sampling import sample_images

    models = tiny_models
    network = nn.Sequential(nn.Dropout(0.5))  # stands for the LoRA network: in train mode during training
    original = _flags(models, network)
    seen: list[tuple[bool, bool]] = []
    hook = models.unet.register_forward_hook(lambda m, a, o: seen.append((m.training, network.training)))
    try:
        models.unet.train()
        models.unet.conv_in.eval()  # a mixed state, restored module by module
        before = (_flags(models, network), _rng_state())
        first = sample_images(
            models,
            PROMPTS,
            sampler_name="ddim",
            device="cpu",
            compute_dtype=torch.float32,
            output_dir=tmp_path_factory.mktemp("a"),
            output_name="lora",
            step=12,
            seed_base=100,
            network=network,
        )
        after = (_flags(models, network), _rng_state())
        first_seen = list(seen)  # the first run's forwards only (the second runs without `network`)
        second = sample_images(
            models,
            [PROMPTS[0], PROMPTS[3]],
            sampler_name="ddim",
            device="cpu",
            compute_dtype=torch.float32,
            output_dir=tmp_path_factory.mktemp("b"),
            output_name="lora",
            step=99,
            epoch=3,
            seed_base=100,
        )
    finally:
        hook.remove()
        for module, flag in zip(
            (
                m
                for model in (models.unet, models.vae, models.text_encoder1, models.text_encoder2, network)
                for m in model.modules()
            ),
            original,
        ):
            module.training = flag
    return first, second, first_seen, before, after


def test_sample_files_are_named_and_sized(sampled):
    from library.train.sampling import images_for_tracker

    first, second, *_ = sampled
    assert all(p.parent.name == "sample" for p in first + second)
    steps_seeds = [p.name.split("_") for p in first]
    assert [(parts[0], parts[1], parts[2], parts[4]) for parts in steps_seeds] == [
        ("lora", "000012", "00", "100.png"),
        ("lora", "000012", "01", "7.png"),
        ("lora", "000012", "02", "7.png"),
        ("lora", "000012", "03", "7.png"),
    ]
    assert all(len(parts[3]) == 14 and parts[3].isdigit() for parts in steps_seeds)  # YYYYmmddHHMMSS
    assert [p.name.split("_")[1:3] for p in second] == [["e000003", "00"], ["e000003", "03"]]
    images = images_for_tracker(first)
    assert [a.shape for a in images] == [(64, 64, 3)] * 3 + [(64, 96, 3)]  # (H, W, 3) from --w 96 --h 64
    assert all(a.dtype == np.uint8 for a in images)
    assert not list(first[0].parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_same_seed_same_bytes_other_seed_or_prompt_differs(sampled):
    first, second, *_ = sampled
    assert first[0].read_bytes() == second[0].read_bytes()  # a later run makes the same image again
    assert first[3].read_bytes() == second[1].read_bytes()  # also with a prompt's own sampler, no CFG
    assert first[0].read_bytes() != first[1].read_bytes()  # other seed
    assert first[1].read_bytes() != first[2].read_bytes()  # other prompt


def test_training_state_is_untouched(sampled):
    *_, seen, before, after = sampled
    assert seen and all(flags == (False, False) for flags in seen)  # eval mode while sampling, LoRA network too
    assert after[0] == before[0]  # every module's train flag restored
    (torch_before, py_before, np_before), (torch_after, py_after, np_after) = before[1], after[1]
    assert torch.equal(torch_before, torch_after) and py_before == py_after
    assert all(np.array_equal(x, y) for x, y in zip(np_before, np_after))


def test_fp8_weights_and_lora_hooks(tiny_models, tmp_path):
    """With fp8-stored base weights (--fp8_base; the UNet then reports dtype float8) the samples are made without
    casting any model, and the forward passes run through the LoRA's hooks."""
    import copy
    import dataclasses

    from library.model.fp8 import FP8_DTYPE, store_weights
    from library.train.sampling import sample_images
    from networks import lora

    unet, te1, te2 = (
        copy.deepcopy(m) for m in (tiny_models.unet, tiny_models.text_encoder1, tiny_models.text_encoder2)
    )
    for model in (unet, te1, te2):
        store_weights(model, FP8_DTYPE, torch.float32)
    models = dataclasses.replace(tiny_models, unet=unet, text_encoder1=te1, text_encoder2=te2)
    network = lora.create_network(1.0, 4, 1.0, models.vae, [te1, te2], unet, neuron_dropout=0.5)
    network.apply_to([te1, te2], unet)
    calls = []
    for module in (network.unet_loras[0], network.text_encoder_loras[0]):
        module.lora_down.register_forward_hook(lambda m, a, o: calls.append(m.training))
    path = sample_images(
        models,
        [PROMPTS[0]],
        sampler_name="euler",
        device="cpu",
        compute_dtype=torch.float32,
        output_dir=tmp_path,
        output_name=None,
        step=1,
        seed_base=0,
        network=network,
    )[0]
    assert path.is_file() and unet.dtype == FP8_DTYPE  # what diffusers reports for this UNet
    assert unet.conv_in.weight.dtype == te2.text_model.encoder.layers[0].mlp.fc1.weight.dtype == FP8_DTYPE
    assert calls and not any(calls)  # the LoRA ran, in eval mode (no dropout)
    assert network.training  # and is back in train mode
