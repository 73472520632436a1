"""`--config_file` / `--output_config`: the file's values are defaults checked like flags, unknown keys are refused.

Nothing here trains or loads a model: the parser is used directly, or `main` with --output_config or with input
that fails while parsing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import train_network
from library.config.cli import build_parser
from library.config.config_file import config_path, config_toml, parse_args
from library.errors import UserInputError
from library.files.toml_io import tomllib
from tests.cli_args import tiny_train_argv

FLAT = """
pretrained_model_name_or_path = "model.safetensors"
output_dir = "out"
learning_rate = 1e-4
network_dim = 16
network_args = ["loraplus_lr_ratio=16"]
loraplus_lr_ratio = 16
enable_bucket = true
flip_aug = false
"""

GROUPED = """
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"

[saving_arguments]
output_dir = "out"

[optimizer_arguments]
learning_rate = 1e-4

[network_arguments]
network_dim = 16
network_args = ["loraplus_lr_ratio=16"]
loraplus_lr_ratio = 16

[dataset_arguments]
enable_bucket = true
flip_aug = false
"""


def _write(tmp_path: Path, text: str, name: str = "train.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _parse(*argv: str) -> argparse.Namespace:
    return parse_args(build_parser(), list(argv))


def _without_file_flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("config_file", "output_config")}


def _run_err(argv: list[str], capsys) -> str:
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_flat_and_grouped_files_give_the_same_namespace(tmp_path):
    flat = _parse("--config_file", str(_write(tmp_path, FLAT, "flat.toml")))
    grouped = _parse("--config_file", str(_write(tmp_path, GROUPED, "grouped.toml")))
    assert _without_file_flags(flat) == _without_file_flags(grouped)
    # the required flags came from the file; values are converted as the command line converts them
    assert flat.pretrained_model_name_or_path == "model.safetensors" and flat.output_dir == "out"
    assert flat.learning_rate == 1e-4 and flat.network_dim == 16
    assert flat.loraplus_lr_ratio == 16.0 and isinstance(flat.loraplus_lr_ratio, float)
    assert flat.network_args == ["loraplus_lr_ratio=16"] and flat.enable_bucket is True and flat.flip_aug is False
    # and the same as spelling it all on the command line
    by_flags = _parse(
        "--pretrained_model_name_or_path",
        "model.safetensors",
        "--output_dir",
        "out",
        "--learning_rate",
        "1e-4",
        "--network_dim",
        "16",
        "--network_args",
        "loraplus_lr_ratio=16",
        "--loraplus_lr_ratio",
        "16",
        "--enable_bucket",
    )
    assert _without_file_flags(flat) == _without_file_flags(by_flags)


def test_command_line_wins_over_the_file(tmp_path):
    path = _write(tmp_path, FLAT + "text_encoder_lr = [1e-5, 2e-5]\n")
    args = _parse(
        "--config_file",
        str(path),
        "--learning_rate",
        "3e-4",
        "--flip_aug",
        "--network_args",
        "loraplus_unet_lr_ratio=8",
        "conv_dim=4",
        "--text_encoder_lr",
        "5e-6",
    )
    assert args.learning_rate == 3e-4  # scalar
    assert args.flip_aug is True  # a switch the file left off
    assert args.enable_bucket is True  # a switch the file turned on stays on
    assert args.network_args == ["loraplus_unet_lr_ratio=8", "conv_dim=4"]  # nargs: replaced, not appended
    assert args.text_encoder_lr == [5e-6]
    assert args.network_dim == 16  # untouched file value
    untouched = _parse("--config_file", str(path))
    assert untouched.text_encoder_lr == [1e-5, 2e-5]


def test_typo_is_refused_with_the_nearest_key(tmp_path, capsys):
    path = _write(tmp_path, FLAT + "loraplus_ratio = 16\n")
    err = _run_err(["--config_file", str(path)], capsys)
    assert err == f"error: config file {path}: unknown key 'loraplus_ratio' (did you mean 'loraplus_lr_ratio'?)"


def test_typo_inside_a_table_is_refused_too(tmp_path, capsys):
    path = _write(tmp_path, GROUPED + "[optimizer_arguments2]\nlearning_rat = 1e-4\nzzz_qqq = 1\n")
    err = _run_err(["--config_file", str(path)], capsys)
    assert "unknown keys 'learning_rat' in [optimizer_arguments2] (did you mean 'learning_rate'?)" in err
    assert "'zzz_qqq' in [optimizer_arguments2] (not a flag of train_network.py; see --help)" in err


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("learning_rate = 1e-4\nlearning_rate 2\n", "is not valid TOML: "),
        ('config_file = "other.toml"\n', "'config_file' cannot be set inside a config file"),
        ("output_config = true\n", "'output_config' cannot be set inside a config file"),
        ('train_data_dir = "C:\\data"\n', "write Windows paths in 'single quotes'"),
        ("network_dim = 16.5\n", "argument --network_dim: invalid int value: '16.5'"),
        ('mixed_precision = "fp32"\n', "argument --mixed_precision: invalid choice: 'fp32'"),
        ('enable_bucket = "yes"\n', "enable_bucket = yes is not allowed; use true or false"),
        ("enable_bucket = 1\n", "enable_bucket = 1 is not allowed; use true or false"),
        ("resolution = [1024, 1024]\n", "resolution takes one value, not a list"),
        ("[a]\n[a.b]\nnetwork_dim = 4\n", "table [a.b] is nested too deep"),
        ("[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n", "key 'network_dim' is set twice"),
    ],
)
def test_bad_files_are_one_line_naming_the_file(tmp_path, capsys, text, fragment):
    path = _write(tmp_path, text)
    out = tmp_path / "out"
    err = _run_err(["--config_file", str(path), *tiny_train_argv(tmp_path / "m.safetensors", tmp_path, out)], capsys)
    assert err.startswith(f"error: config file {path}") and fragment in err, err
    assert not out.exists()


def test_missing_file_is_one_line(tmp_path, capsys):
    err = _run_err(["--config_file", str(tmp_path / "nope")], capsys)
    assert err == f"error: config file {tmp_path / 'nope.toml'} not found; check --config_file"


def test_name_without_suffix_finds_the_toml(tmp_path, monkeypatch):
    _write(tmp_path, FLAT)
    monkeypatch.chdir(tmp_path)
    assert config_path("train") == Path("train.toml")
    assert _parse("--config_file", "train").network_dim == 16
    assert config_path("train.toml") == Path("train.toml")
    _write(tmp_path, FLAT, "plain")  # an existing file without the suffix is read as named ...
    assert config_path("plain") == Path("plain")
    assert config_path("new") == Path("new.toml")  # ... and a name for --output_config gets the suffix


def test_keys_follow_the_parser_not_a_list(tmp_path):
    """A flag added to the parser later is a valid key at once (cli.py grows while this module does not)."""
    parser = build_parser()
    parser.add_argument_group("later").add_argument("--brand_new_steps", type=int, default=None)
    args = parse_args(parser, ["--config_file", str(_write(tmp_path, FLAT + "brand_new_steps = 7\n"))])
    assert args.brand_new_steps == 7
    assert "[later]\nbrand_new_steps = 7" in config_toml(parser, args)


TRICKY = [
    "--output_name",
    'my "quoted" lora',
    "--training_comment",
    'C:\\Users\\me\\lora "v2" \\x7f tab\there del\x7f é ü ',
    "--caption_prefix",
    "-starts with a dash",
    "--learning_rate",
    "3e-7",
    "--unet_lr",
    "0.1",
    "--text_encoder_lr",
    "1e-5",
    "2.5e-5",
    "--network_alpha",
    "-0.5",
    "--lr_warmup_steps",
    "0.05",
    "--network_args",
    "loraplus_lr_ratio=16",
    'note="hi"',
    "--optimizer_args",
    "weight_decay=0.01",
    "--flip_aug",
    "--keep_tokens_separator",
    "|||",
    "--caption_separator",
    "",
]


def test_output_config_round_trips(tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_train_argv(tmp_path / "m.safetensors", tmp_path / "data", out, *TRICKY)
    assert train_network.main([*argv, "--output_config"]) == 0
    written = out / 'my "quoted" lora.toml'
    assert capsys.readouterr().out.strip() == f"arguments written to {written}"
    assert sorted(p.name for p in out.iterdir()) == [written.name]  # nothing else: no training, no loading
    tables = tomllib.loads(written.read_text(encoding="utf-8"))
    assert {"model", "data", "network", "optimizer_and_schedule", "saving_and_logging"} <= tables.keys()
    assert tables["network"]["network_args"] == ["loraplus_lr_ratio=16", 'note="hi"']
    assert "config_files" not in tables and "network_dropout" not in tables["network"]  # None left out
    assert _without_file_flags(_parse("--config_file", str(written))) == _without_file_flags(_parse(*argv))


def test_output_config_defaults_round_trip_and_go_to_config_file_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out"]
    assert train_network.main([*argv, "--config_file", "saved", "--output_config"]) == 0
    assert capsys.readouterr().out.strip() == "arguments written to saved.toml"
    assert not Path("out").exists()
    assert _without_file_flags(_parse("--config_file", "saved")) == _without_file_flags(_parse(*argv))


def test_output_config_never_replaces_an_existing_file(tmp_path, capsys):
    path = _write(tmp_path, GROUPED)
    before = path.read_bytes()
    assert train_network.main(["--config_file", str(path), "--network_dim", "32", "--output_config"]) == 2
    assert "already exists and is kept" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_file_values_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(UserInputError, match="argument --network_dim: invalid int value"):
        _parse("--config_file", str(_write(tmp_path, FLAT.replace("network_dim = 16", 'network_dim = "x"'))))


def test_the_command_line_loads_no_model_library(tmp_path):
    """--help and --config_file parsing stay fast: building the parser and reading a config file import neither
    torch, numpy nor diffusers (the names the flags offer come from the torch-free parts of library.train)."""
    code = (
        "import sys; from library.config.cli import build_parser; from library.config.config_file import parse_args; "
        "parser = build_parser(); parser.format_help(); parse_args(parser, ['--config_file', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(_write(tmp_path, FLAT))], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
