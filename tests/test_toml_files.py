"""Every TOML input (--config_file, --dataset_config, --sample_prompts) is read as TOML 1.0 by the standard parser,
loses nothing, and a broken file of any kind is one `error:` line naming the file, never a traceback; keys of
sd-scripts options we lack are accepted with one note while off and refused by name when on.

Nothing here loads a model: `main` stops while checking its input (the model path is a placeholder .ckpt, which
is only checked for existence).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import train_network
from library.config.cli import build_parser
from library.config.config_file import parse_args, parser_actions
from library.data.dataset_config import CLI_FALLBACK_KEYS, DatasetConfig, load_dataset_config
from library.errors import UserInputError
from library.sdscripts_options import UNIMPLEMENTED_DATASET_KEYS, UNIMPLEMENTED_FLAGS
from library.train.sampling import load_sample_prompts

CLI = DatasetConfig().cli_values()
GOOD = {
    "config": "network_dim = 8\n",
    "dataset": "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'images'\n",
    "prompts.toml": "[prompt]\n[[prompt.subset]]\nprompt = 'a cat'\n",
    "prompts.txt": "a cat --w 512\n",
    "prompts.json": '[{"prompt": "a cat"}]',
}
CORRUPT = {  # (bytes, what the one line must say)
    "empty": (b"", None),
    "truncated": (None, None),  # the good file cut in half
    "garbage": (bytes(range(256)) * 4, "is not UTF-8 text (byte 0x80 at offset 128); save it as UTF-8"),
    "latin-1": ("class_tokens = 'café'\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    "wrong type": (None, None),
}
WRONG_TYPE = {
    "config": (b"network_dim = [8, 16]\n", "network_dim takes one value, not a list"),
    "dataset": (b"datasets = [5]\n", "[[datasets]] #1: must be a table ([[datasets]]), not 5"),
    "prompts.toml": (b"prompt = 5\n", "needs a [prompt] table with [[prompt.subset]] entries"),
    "prompts.txt": (b"a cat --w wide\n", "line 1: width must be an integer, not 'wide'"),
    "prompts.json": (b'{"prompt": "a cat"}', "must hold a JSON list of prompts"),
}
EMPTY = {
    "config": "holds no arguments (it is empty or only comments); write them into it, or leave out --config_file",
    "dataset": "top level: no [[datasets]] block: add one with at least one [[datasets.subsets]]",
    "prompts.toml": "needs a [prompt] table with [[prompt.subset]] entries",
    "prompts.txt": "holds no prompts; add some (see --help) or leave out --sample_prompts",
    "prompts.json": "is not valid JSON",
}
TRUNCATED = {
    "config": "is not valid TOML: ",
    "dataset": "is not valid TOML: ",
    "prompts.toml": "is not valid TOML: ",
    "prompts.json": "is not valid JSON",
}


def _argv(tmp_path: Path, kind: str, path: Path, model: Path) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")]
    if kind == "config":
        return [*argv, "--train_data_dir", str(data), "--config_file", str(path)]
    if kind == "dataset":
        return [*argv, "--dataset_config", str(path)]
    return [*argv, "--train_data_dir", str(data), "--sample_prompts", str(path)]


@pytest.mark.parametrize(
    "kind, corruption",
    [
        (kind, corruption)
        for kind in GOOD
        for corruption in CORRUPT
        if (kind, corruption) != ("prompts.txt", "truncated")  # half a prompt line is still a prompt
    ],
)
def test_broken_file_is_one_line_naming_it(tiny_sdxl, tmp_path, capsys, kind, corruption):
    """The model is a real one (the start-up check refuses a damaged model before any of these files)."""
    data, expected = CORRUPT[corruption]
    if corruption == "truncated":
        data, expected = GOOD[kind].encode()[: len(GOOD[kind]) // 2], TRUNCATED[kind]
    elif corruption == "wrong type":
        data, expected = WRONG_TYPE[kind]
    elif corruption == "empty":
        expected = EMPTY[kind]
    path = tmp_path / (f"file.{kind.split('.')[-1]}" if "." in kind else "file.toml")
    path.write_bytes(data)
    assert train_network.main(_argv(tmp_path, kind, path, tiny_sdxl.single_file)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(path) in err and expected in err, err
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_good_files_pass_the_checks(tmp_path):
    """The files the corruptions start from are fine (so each failure above is the corruption's)."""
    parser = build_parser()
    for kind, text in GOOD.items():
        path = tmp_path / (f"good.{kind.split('.')[-1]}" if "." in kind else f"good_{kind}.toml")
        path.write_text(text, encoding="utf-8")
        if kind == "config":
            assert (
                parse_args(
                    parser, ["--config_file", str(path), "--pretrained_model_name_or_path", "m", "--output_dir", "o"]
                ).network_dim
                == 8
            )
        elif kind == "dataset":
            assert load_dataset_config(path, CLI).datasets[0].subsets[0].image_dir == Path("images")
        else:
            assert [p.prompt for p in load_sample_prompts(path)] == ["a cat"]


def test_bom_from_windows_editors_is_skipped(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD["config"].encode())
    assert (
        parse_args(
            build_parser(), ["--config_file", str(path), "--pretrained_model_name_or_path", "m", "--output_dir", "o"]
        ).network_dim
        == 8
    )


# --- TOML 1.0, read without loss (the `toml` 0.10 package rejected or mangled each of these) -----------------------
def test_config_file_mixed_number_array_is_toml_1_0(tmp_path):
    """`toml` 0.10: "Not a homogeneous array"; TOML 1.0 allows ints and floats in one array."""
    path = tmp_path / "train.toml"
    path.write_text("text_encoder_lr = [1e-5, 2]\n", encoding="utf-8")
    args = parse_args(
        build_parser(), ["--config_file", str(path), "--pretrained_model_name_or_path", "m", "--output_dir", "o"]
    )
    assert args.text_encoder_lr == [1e-5, 2.0]


def test_dataset_config_keeps_every_array_element(tmp_path):
    """`toml` 0.10 loads `datasets = [{...}, {...}, 7]` as the first two tables and drops the 7 without a word;
    here the 7 is an error, and the TOML 1.0 inline form of two datasets gives two datasets."""
    two = (
        "datasets = [{resolution = 64, subsets = [{image_dir = 'a'}]},\n"
        "            {resolution = [64, 128], subsets = [{image_dir = 'b', num_repeats = 3}]}]\n"
    )
    path = tmp_path / "two.toml"
    path.write_text(two, encoding="utf-8")
    config = load_dataset_config(path, CLI)
    assert [d.buckets.resolution for d in config.datasets] == [(64, 64), (64, 128)]
    assert [(s.image_dir.name, s.num_repeats) for d in config.datasets for s in d.subsets] == [("a", 1), ("b", 3)]
    path.write_text(two.replace("}]}]", "}]}, 7]"), encoding="utf-8")
    with pytest.raises(UserInputError, match=r"\[\[datasets\]\] #3: must be a table \(\[\[datasets\]\]\), not 7"):
        load_dataset_config(path, CLI)


def test_prompt_file_mixed_table_and_line_entries(tmp_path):
    """A prompt list mixing a table and a line (TOML 1.0; `toml` 0.10 keeps only the table)."""
    path = tmp_path / "p.toml"
    path.write_text('[prompt]\nsubset = [{prompt = "a cat", width = 640}, "a dog --h 768"]\n', encoding="utf-8")
    prompts = load_sample_prompts(path)
    assert [(p.prompt, p.width, p.height) for p in prompts] == [("a cat", 640, 512), ("a dog", 512, 768)]


# --- sd-scripts options we lack --------------------------------------------------------------------------------
GUI_KEYS_OFF = """
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"
v2 = false
vae = ""
clip_skip = 1
[saving_arguments]
output_dir = "out"
huggingface_repo_id = ""
huggingface_repo_visibility = "public"
metadata_title = ""
no_metadata = false
[training_arguments]
network_dim = 16
torch_compile = false
dynamo_backend = "no"
deepspeed = false
zero_stage = 3
masked_loss = false
scale_weight_norms = 0
base_weights_multiplier = [1.0]
wandb_api_key = ""
log_config = true
[dataset_arguments]
color_aug = false
token_warmup_min = 1
token_warmup_step = 0
face_crop_aug_range = ""
"""


def test_sdscripts_options_that_are_off_load_with_one_note(tmp_path, caplog):
    path = tmp_path / "gui.toml"
    path.write_text(GUI_KEYS_OFF, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        args = parse_args(build_parser(), ["--config_file", str(path)])
    assert args.network_dim == 16 and args.output_dir == "out"
    notes = [r.getMessage() for r in caplog.records if "sd-scripts options" in r.getMessage()]
    assert len(notes) == 1
    listed = notes[0].rsplit(": ", 1)[1].split(", ")
    assert listed == sorted(
        [
            "v2",
            "vae",
            "clip_skip",
            "huggingface_repo_id",
            "huggingface_repo_visibility",
            "metadata_title",
            "no_metadata",
            "deepspeed",
            "zero_stage",
            "masked_loss",
            "scale_weight_norms",
            "base_weights_multiplier",
            "wandb_api_key",
            "log_config",
            "color_aug",
            "token_warmup_min",
            "token_warmup_step",
            "face_crop_aug_range",
        ]
    )
    assert not hasattr(args, "vae") and not hasattr(args, "color_aug")  # nothing of them reaches the run
    # Implemented since: GUI files write them off, and "no" (accelerate's word) is accepted.
    assert args.torch_compile is False and args.dynamo_backend == "no"


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "color_aug = true",
            "'color_aug' = true is an sd-scripts option this trainer does not implement and would "
            "change the run: remove it or set it to false",
        ),
        ("clip_skip = 2", "'clip_skip' = 2 is an sd-scripts option"),
        ('vae = "sdxl_vae.safetensors"', "'vae' = \"sdxl_vae.safetensors\" is an sd-scripts option"),
        ("token_warmup_min = 3", "remove it or set it to 1"),
        ("deepspeed = true\nzero_stage = 3", "'deepspeed' = true"),
        ("use_8bit_adam = true", '; use optimizer_type = "AdamW8bit"'),
        ('huggingface_repo_id = "me/lora"', "'huggingface_repo_id' = \"me/lora\""),
    ],
)
def test_sdscripts_options_that_are_on_are_refused_by_name(tmp_path, capsys, line, message):
    path = tmp_path / "on.toml"
    path.write_text(f"network_dim = 8\n[extra]\n{line}\n", encoding="utf-8")
    assert (
        train_network.main(
            ["--config_file", str(path), "--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config file {path}: ") and message in err and len(err.splitlines()) == 1, err


def test_dataset_keys_we_lack_follow_the_same_rule(tmp_path, caplog):
    path = tmp_path / "d.toml"
    text = (
        "[general]\ncolor_aug = false\n[[datasets]]\nvalidation_split = 0.0\n"
        "[[datasets.subsets]]\nimage_dir = 'x'\nalpha_mask = false\ntoken_warmup_min = 1\n"
    )
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert load_dataset_config(path, CLI).datasets[0].subsets[0].image_dir == Path("x")
    notes = [r.getMessage() for r in caplog.records if "sd-scripts keys" in r.getMessage()]
    assert len(notes) == 1 and notes[0].endswith("alpha_mask, color_aug, token_warmup_min, validation_split")
    path.write_text(text.replace("alpha_mask = false", "alpha_mask = true"), encoding="utf-8")
    with pytest.raises(
        UserInputError,
        match=r"\[\[datasets.subsets\]\] #1: 'alpha_mask' = true is an sd-scripts "
        "option this trainer does not implement",
    ):
        load_dataset_config(path, CLI)


def test_the_tables_name_only_options_we_lack():
    """A flag or dataset key we implement must never be swallowed by the "not implemented" tables."""
    ours = {action.dest for action in parser_actions(build_parser())}
    assert not ours & UNIMPLEMENTED_FLAGS.keys()
    assert not set(CLI_FALLBACK_KEYS) & UNIMPLEMENTED_DATASET_KEYS.keys()
    assert {"image_dir", "is_reg"}.isdisjoint(UNIMPLEMENTED_DATASET_KEYS)
    for table in (UNIMPLEMENTED_FLAGS, UNIMPLEMENTED_DATASET_KEYS):
        for name, option in table.items():
            assert option.needs is None or option.needs in table, name
            json.dumps(option.default)  # a plain TOML-able default
