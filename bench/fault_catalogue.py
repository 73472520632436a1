"""The faults of bench/fault_table.py, in the order of its table: each registers how to set its case up (damage a
file, put a file in the way, start a run to signal) and what exit code it should end with."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from bench.fault_harness import BASE_STEPS, Action, Case, Fault, Outcome, run_process, steps_done, train_cmd  # noqa: E402

FAULTS: list[Fault] = []


def fault(key: str, group: str, title: str, expect: int = 2, may_change: tuple[str, ...] = ()):
    def register(setup: Callable[[Case], Action | str]) -> Callable[[Case], Action | str]:
        FAULTS.append(Fault(len(FAULTS) + 1, key, group, title, setup, expect, may_change))
        return setup

    return register


def flags_fault(key: str, group: str, title: str, *extra: str, expect: int = 2, steps: int = BASE_STEPS) -> None:
    """A fault that is only a command line: the earlier run's, plus `extra`."""
    fault(key, group, title, expect)(lambda case: lambda: case.train(case.argv(*extra, steps=steps)))


def damage(path: Path, kind: str) -> None:
    """Replace the file at `path` (a file, or a symlink to a pristine one) by an empty, half, random or JPEG file, or
    by a folder."""
    original = path.read_bytes()
    path.unlink()
    if kind == "folder":
        path.mkdir()
        return
    data = {
        "empty": b"",
        "truncated": original[: len(original) // 2],
        "garbage": random.Random(len(original)).randbytes(max(len(original), 64)),
        "jpeg": jpeg_bytes(),
    }[kind]
    path.write_bytes(data)


def jpeg_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


# NaN / inf ------------------------------------------------------------------------------------------------------------
NAN = "NaN/inf"
flags_fault(
    "nan_stop",
    NAN,
    "lr 1e30, no clipping: NaN loss at step 2",
    "--learning_rate",
    "1e30",
    "--max_grad_norm",
    "0",
    expect=3,
    steps=6,
)
flags_fault(
    "nan_budget",
    NAN,
    "lr 1e30 with --max_nan_steps 1: one step skipped, then stop",
    "--learning_rate",
    "1e30",
    "--max_grad_norm",
    "0",
    "--max_nan_steps",
    "1",
    expect=3,
    steps=6,
)
flags_fault(
    "fp16_overflow_save",
    NAN,
    "lr 1e5, --save_precision fp16: the final LoRA overflows fp16 at save",
    "--learning_rate",
    "1e5",
    "--max_grad_norm",
    "0",
    "--save_precision",
    "fp16",
    expect=3,
    steps=1,
)
flags_fault("nan_lr_flag", NAN, "--learning_rate nan", "--learning_rate", "nan")
flags_fault("nan_steps_negative", NAN, "--max_nan_steps -1", "--max_nan_steps", "-1")

# Empty runs -----------------------------------------------------------------------------------------------------------
EMPTY = "empty run"
flags_fault("steps0", EMPTY, "--max_train_steps 0", steps=0)
flags_fault("epochs0", EMPTY, "--max_train_epochs 0", "--max_train_epochs", "0")
flags_fault("lr0", EMPTY, "--learning_rate 0", "--learning_rate", "0")
flags_fault("unet_lr0", EMPTY, "--unet_lr 0 with --network_train_unet_only", "--unet_lr", "0")
flags_fault(
    "block_weights0",
    EMPTY,
    "every block lr weight 0 (down/mid/up_lr_weight)",
    "--network_args",
    "down_lr_weight=zeros",
    "mid_lr_weight=0,0,0",
    "up_lr_weight=zeros",
)
flags_fault("negative_lr", EMPTY, "--learning_rate=-1e-4", "--learning_rate=-1e-4")


@fault("resume_at_end", EMPTY, "--resume the earlier run's final state, same --max_train_steps")
def _resume_at_end(case: Case) -> Action:
    return lambda: case.train(case.argv("--resume", str(case.state)))


# Lock -----------------------------------------------------------------------------------------------------------------
LOCK = "lock"


@fault("second_run", LOCK, "a second run on the same output while the first trains", expect=75)
def _second_run(case: Case) -> Action:
    def act() -> Outcome:
        first = case.start(case.argv(name="busy", steps=100_000), ".first")
        try:
            if not first.wait_for(steps_done):
                return first.finish("the first run ended before it trained a step")
            second = run_process(train_cmd(case.argv(name="busy")))
        finally:
            first.send(signal.SIGTERM)
        done = first.finish()
        return Outcome(
            second.rc, second.stderr, second.stdout, f"the first run, then stopped by SIGTERM: exit {done.rc}"
        )

    return act


@fault("stale_lock", LOCK, "kill -9 during training, then the same command again (stale lock)", expect=0)
def _stale_lock(case: Case) -> Action:
    def act() -> Outcome:
        argv = case.argv(name="again", steps=100_000)
        first = case.start(argv, ".killed")
        if not first.wait_for(steps_done):
            return first.finish("the first run ended before it trained a step")
        first.kill()
        killed = first.finish()
        left = (case.out / "again.lock").exists()
        rerun = run_process(train_cmd(case.argv(name="again")))
        return Outcome(
            rerun.rc,
            rerun.stderr,
            rerun.stdout,
            f"first run killed (exit {killed.rc}), lock left: {'yes' if left else 'no'}",
        )

    return act


# Signals --------------------------------------------------------------------------------------------------------------
SIGNALS = "signal"


def signal_after(
    case: Case,
    signum: int,
    seen: Callable[[str, str], bool],
    what: str,
    argv: list[str] | None = None,
    second: float | None = None,
) -> Outcome:
    """Start a long run, send `signum` once `seen(stdout, stderr)` holds (again after `second` seconds)."""
    started = case.start(argv or case.argv(steps=100_000))
    if not started.wait_for(seen):
        started.kill()
        return started.finish(f"never saw {what}: no signal sent")
    started.send(signum)
    if second is not None:
        time.sleep(second)
        started.send(signum)
    return started.finish(f"{signal.Signals(signum).name} sent after {what}")


# A save refreshes the output's run report (issue 13), and the save after an interrupt is a save: the stopped run's
# page and JSON take over `out/run_report.*` beside its resumable state. Every LoRA and state stays.
REPORT_FILES = ("out/run_report.json", "out/run_report.html")


@fault("sigterm_training", SIGNALS, "SIGTERM after a training step", expect=143, may_change=REPORT_FILES)
def _sigterm_training(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, steps_done, "a finished step")


@fault("sigint_training", SIGNALS, "SIGINT (Ctrl-C) after a training step", expect=130, may_change=REPORT_FILES)
def _sigint_training(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGINT, steps_done, "a finished step")


@fault("sigterm_twice", SIGNALS, "two SIGTERMs 0.2 s apart (the second during the emergency save)", expect=143)
def _sigterm_twice(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, steps_done, "a finished step", second=0.2)


@fault("sigterm_loading", SIGNALS, "SIGTERM right after the precision line (set-up, model loading)", expect=143)
def _sigterm_loading(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, lambda out, err: "precision:" in out, "the precision line")


@fault("sigint_caching", SIGNALS, "SIGINT while caching latents to disk (300 new images)", expect=130)
def _sigint_caching(case: Case) -> Action:
    from tools.make_demo_dataset import make_demo_dataset

    big = case.inputs / "big"
    make_demo_dataset(big, count=300, min_side=64, max_side=128, seed=1)

    def cached(out: str, err: str) -> bool:
        return next(big.rglob("*_sdxl.npz"), None) is not None

    return lambda: signal_after(
        case, signal.SIGINT, cached, "the first latent cache file", argv=case.argv(data=big, steps=100_000)
    )


@fault("sigint_startup", SIGNALS, "SIGINT 1 s after start (imports, before any file is read)", expect=130)
def _sigint_startup(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGINT, _after(1.0), "1 s")


@fault("sigterm_startup", SIGNALS, "SIGTERM 1 s after start (imports, before any file is read)", expect=143)
def _sigterm_startup(case: Case) -> Action:
    return lambda: signal_after(case, signal.SIGTERM, _after(1.0), "1 s")


def _after(seconds: float) -> Callable[[str, str], bool]:
    end = time.monotonic() + seconds
    return lambda out, err: time.monotonic() >= end


# Output folder --------------------------------------------------------------------------------------------------------
OUTPUT = "output folder"


@fault("output_is_file", OUTPUT, "--output_dir is a file")
def _output_is_file(case: Case) -> Action:
    target = case.input_file("not_a_folder", b"user file")
    return lambda: case.train(case.argv(out=target))


@fault("output_under_file", OUTPUT, "--output_dir below a file")
def _output_under_file(case: Case) -> Action:
    target = case.input_file("not_a_folder", b"user file")
    return lambda: case.train(case.argv(out=target / "out"))


@fault("logging_dir_is_file", OUTPUT, "--logging_dir is a file")
def _logging_dir_is_file(case: Case) -> Action:
    target = case.input_file("logs", b"user file")
    return lambda: case.train(case.argv("--logging_dir", str(target)))


def read_only_folder(case: Case) -> Path | str:
    """A read-only folder: a read-only tmpfs for root (whom permissions do not stop), mode 0555 otherwise; a
    reason to skip when neither is possible."""
    folder = case.inputs / "read_only"
    folder.mkdir(parents=True)
    if os.name != "posix":
        return "needs POSIX permissions"
    if getattr(os, "geteuid", lambda: 0)() != 0:
        folder.chmod(0o555)
        case.cleanups.append(lambda: folder.chmod(0o755))
        return folder
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        return f"root, but a read-only tmpfs cannot be mounted here ({mounted.stderr.strip()[:80]})"
    case.cleanups.append(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))
    return folder


@fault("output_read_only", OUTPUT, "--output_dir is read-only")
def _output_read_only(case: Case) -> Action | str:
    folder = read_only_folder(case)
    return folder if isinstance(folder, str) else lambda: case.train(case.argv(out=folder))


@fault("output_in_read_only", OUTPUT, "--output_dir to be made inside a read-only folder")
def _output_in_read_only(case: Case) -> Action | str:
    folder = read_only_folder(case)
    return folder if isinstance(folder, str) else lambda: case.train(case.argv(out=folder / "new"))


@fault("low_disk", OUTPUT, "10 MiB free on the output disk (patched disk_usage)")
def _low_disk(case: Case) -> Action:
    return lambda: case.train(case.argv(), {"free_bytes": 10 << 20})


# Full disk, per kind of file ---------------------------------------------------------------------------------------
DISK = "full disk"
RUN_FILES = ("out/run.safetensors", "out/run-ema.safetensors", "out/run_param_groups.json", "out/run-state/*")
"""What a finished run writes, in this order, before its report: the files a fault after them may have replaced."""


def full_disk(
    key: str,
    title: str,
    target: str,
    code: str = "ENOSPC",
    may_change: tuple[str, ...] = (),
    make_argv: Callable[[Case], list[str]] | None = None,
    expect: int = 2,
) -> None:
    """A run whose writes of files named like `target` (a regex) fail with `code` once a few bytes are in."""

    @fault(key, DISK, title, expect=expect, may_change=may_change)
    def setup(case: Case) -> Action:
        argv = make_argv(case) if make_argv else case.argv()
        return lambda: case.train(argv, {"full_disk": target, "errno": code})


full_disk("disk_lora", "ENOSPC writing the final LoRA", r"run\.safetensors")
full_disk("disk_ema", "EDQUOT writing the EMA file", r"run-ema\.safetensors", "EDQUOT")
full_disk(
    "disk_param_groups",
    "ENOSPC writing run_param_groups.json (after the LoRA and EMA: those are this run's)",
    r"run_param_groups\.json",
    may_change=RUN_FILES[:2],
)
full_disk(
    "disk_report",
    "ENOSPC writing run_report.json (after the LoRA, EMA, groups and state: this run's): a warning line, the run "
    "ends (exit 0), the earlier report and page are kept",
    r"run_report\.json",
    may_change=RUN_FILES,
    expect=0,
)
full_disk(
    "disk_latent_cache",
    "EFBIG writing a latent cache (new size, 128 px)",
    r".*_sdxl\.npz",
    "EFBIG",
    make_argv=lambda case: case.argv("--resolution", "128", "--min_bucket_reso", "128", "--max_bucket_reso", "192"),
)
full_disk(
    "disk_te_cache",
    "ENOSPC rewriting a text-encoder cache (other captions)",
    r".*_te_outputs\.npz",
    make_argv=lambda case: case.argv("--caption_prefix", "other, "),
)


@fault(
    "disk_state",
    DISK,
    "ENOSPC writing the state's optimizer.bin (after the LoRA, EMA and groups: those are this run's)",
    may_change=RUN_FILES[:3],
)
def _disk_state(case: Case) -> Action:
    return lambda: case.train(case.argv(), {"torch_save_full": "optimizer.bin"})


@fault("disk_output_config", DISK, "ENOSPC writing --output_config's TOML")
def _disk_output_config(case: Case) -> Action:
    return lambda: case.train(case.argv("--output_config"), {"full_disk": r"run\.toml", "errno": "ENOSPC"})


# Damaged inputs -------------------------------------------------------------------------------------------------------
MODEL = "damaged model"


def model_fault(kind: str) -> None:
    @fault(f"model_{kind}", MODEL, f"model .safetensors {kind}")
    def setup(case: Case) -> Action:
        model = case.model_copy()
        damage(model, kind)
        return lambda: case.train(case.argv(model=model))


for _kind in ("empty", "truncated", "garbage"):
    model_fault(_kind)


def ckpt_fault(kind: str) -> None:
    @fault(f"ckpt_{kind}", MODEL, f"model .ckpt {kind}")
    def setup(case: Case) -> Action:
        import torch
        from safetensors.torch import load_file

        model = case.model_copy(".ckpt")
        torch.save({"state_dict": load_file(str(case.ws.model))}, model)
        damage(model, kind)
        return lambda: case.train(case.argv(model=model))


for _kind in ("truncated", "garbage"):
    ckpt_fault(_kind)


def diffusers_fault(key: str, name: str, kind: str) -> None:
    @fault(key, MODEL, f"diffusers folder: {name} {kind}")
    def setup(case: Case) -> Action:
        folder = case.diffusers_mirror()
        damage(folder / name, kind)
        return lambda: case.train(case.argv(model=folder))


diffusers_fault("diffusers_config", "unet/config.json", "garbage")
diffusers_fault("diffusers_index", "model_index.json", "truncated")
diffusers_fault("diffusers_weights", "unet/diffusion_pytorch_model.safetensors", "truncated")
diffusers_fault("diffusers_te2_folder", "text_encoder_2/model.safetensors", "folder")


def sharded_unet(case: Case) -> Path:
    """The diffusers folder with its UNet in two shards and an index (as large models are published)."""
    from safetensors.torch import load_file, save_file

    folder = case.diffusers_mirror()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    weights.unlink()
    names = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"diffusion_pytorch_model-0000{number}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(folder / "unet" / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


@fault("shard_index", MODEL, "diffusers folder: UNet shard index garbage")
def _shard_index(case: Case) -> Action:
    folder = sharded_unet(case)
    damage(folder / "unet" / "diffusion_pytorch_model.safetensors.index.json", "garbage")
    return lambda: case.train(case.argv(model=folder))


@fault("shard_truncated", MODEL, "diffusers folder: UNet shard 2 of 2 truncated")
def _shard_truncated(case: Case) -> Action:
    folder = sharded_unet(case)
    damage(folder / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors", "truncated")
    return lambda: case.train(case.argv(model=folder))


WEIGHTS = "damaged --network_weights"


def lora_fault(kind: str, dim_from_weights: bool) -> None:
    title = f"--network_weights {kind}" + (" + --dim_from_weights" if dim_from_weights else "")

    @fault(f"weights_{kind}", WEIGHTS, title)
    def setup(case: Case) -> Action:
        weights = case.input_file("lora.safetensors", case.lora.read_bytes())
        damage(weights, kind)
        extra = ["--network_weights", str(weights), *(["--dim_from_weights"] if dim_from_weights else [])]
        return lambda: case.train(case.argv(*extra))


lora_fault("empty", False)
lora_fault("truncated", True)
lora_fault("jpeg", False)


def _sd15_lora() -> dict:
    import torch

    names = [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    ]
    return {
        key: value
        for name in names
        for key, value in {
            f"{name}.lora_down.weight": torch.zeros(4, 320),
            f"{name}.lora_up.weight": torch.zeros(320, 4),
            f"{name}.alpha": torch.tensor(4.0),
        }.items()
    }


def _lycoris() -> dict:
    import torch

    return {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(4, 4)}


def _not_a_lora() -> dict:
    import torch

    return {"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}


def foreign_fault(kind: str, make: Callable[[], dict]) -> None:
    @fault(f"weights_{kind}", WEIGHTS, f"--network_weights {kind} file + --dim_from_weights")
    def setup(case: Case) -> Action:
        from safetensors.torch import save_file

        case.inputs.mkdir(parents=True, exist_ok=True)
        weights = case.inputs / f"{kind}.safetensors"
        save_file(make(), str(weights))
        return lambda: case.train(case.argv("--network_weights", str(weights), "--dim_from_weights"))


foreign_fault("sd15", _sd15_lora)
foreign_fault("lycoris", _lycoris)
foreign_fault("random", _not_a_lora)

STATE = "damaged --resume state"
STATE_DAMAGE = (
    ("train_state.json", "garbage"),
    ("optimizer.bin", "truncated"),
    ("scheduler.bin", "empty"),
    ("random_states_0.pkl", "jpeg"),
    ("custom_checkpoint_0.pkl", "garbage"),
    ("custom_checkpoint_1.pkl", "folder"),
    ("custom_checkpoint_2.pkl", "truncated"),
)
"""One damage per file of the earlier run's state (0: the LoRA, 1: the progress, 2: the EMA)."""


def state_fault(name: str, kind: str) -> None:
    @fault(f"state_{name.split('.')[0]}", STATE, f"--resume: {name} {kind}")
    def setup(case: Case) -> Action:
        damage(case.state / name, kind)
        return lambda: case.train(case.argv("--resume", str(case.state), steps=BASE_STEPS + 1))


for _name, _kind in STATE_DAMAGE:
    state_fault(_name, _kind)


@fault("state_no_ema", STATE, "--resume a state without its EMA file, with --ema_decay")
def _state_no_ema(case: Case) -> Action:
    (case.state / "custom_checkpoint_2.pkl").unlink()
    return lambda: case.train(case.argv("--resume", str(case.state), steps=BASE_STEPS + 1))


CACHE = "damaged cache"


@fault(
    "latent_cache_damaged",
    CACHE,
    "latent caches empty / truncated / garbage / JPEG (recomputed)",
    expect=0,
    may_change=("data/*/*_sdxl.npz",),
)
def _latent_cache_damaged(case: Case) -> Action:
    for path, kind in zip(sorted(case.data.rglob("*_sdxl.npz")), ("empty", "truncated", "garbage", "jpeg")):
        damage(path, kind)
    return lambda: case.train(case.argv(name="again", steps=1))


@fault(
    "te_cache_damaged",
    CACHE,
    "text-encoder caches empty / truncated / garbage / JPEG (recomputed)",
    expect=0,
    may_change=("data/*/*_te_outputs.npz",),
)
def _te_cache_damaged(case: Case) -> Action:
    for path, kind in zip(sorted(case.data.rglob("*_te_outputs.npz")), ("empty", "truncated", "garbage", "jpeg")):
        damage(path, kind)
    return lambda: case.train(case.argv(name="again", steps=1))


@fault("latent_cache_folder", CACHE, "a folder where a latent cache should be")
def _latent_cache_folder(case: Case) -> Action:
    damage(sorted(case.data.rglob("*_sdxl.npz"))[0], "folder")
    return lambda: case.train(case.argv(name="again", steps=1))


TOML = "damaged TOML"


@fault("toml_config_syntax", TOML, "--config_file with a TOML syntax error")
def _toml_config_syntax(case: Case) -> Action:
    config = case.input_file("train.toml", b'learning_rate = 1e-3\noutput_name = "unterminated\n')
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_config_key", TOML, "--config_file with an unknown key")
def _toml_config_key(case: Case) -> Action:
    config = case.input_file("train.toml", b"learning_rate = 1e-3\nlearning_rat = 2e-3\n")
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_config_binary", TOML, "--config_file is a JPEG")
def _toml_config_binary(case: Case) -> Action:
    config = case.input_file("train.toml", jpeg_bytes())
    return lambda: case.train(case.argv("--config_file", str(config)))


@fault("toml_dataset_syntax", TOML, "--dataset_config with a TOML syntax error")
def _toml_dataset_syntax(case: Case) -> Action:
    config = case.input_file("dataset.toml", b"[[datasets]]\nresolution = [64, 64\n")
    return lambda: case.train(case.argv("--dataset_config", str(config), data=None))


@fault("toml_dataset_value", TOML, "--dataset_config with a wrong value type")
def _toml_dataset_value(case: Case) -> Action:
    text = f'[[datasets]]\nresolution = "big"\n[[datasets.subsets]]\nimage_dir = "{case.data / "1_toy"}"\n'
    config = case.input_file("dataset.toml", text.encode())
    return lambda: case.train(case.argv("--dataset_config", str(config), data=None))


@fault("toml_prompts_syntax", TOML, "--sample_prompts .toml with a syntax error")
def _toml_prompts_syntax(case: Case) -> Action:
    prompts = case.input_file("prompts.toml", b'[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a red\n')
    return lambda: case.train(case.argv("--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))


# Bad flags ------------------------------------------------------------------------------------------------------------
FLAGS = "bad flag"
flags_fault("unknown_flag", FLAGS, "an unknown flag (--learning_rte)", "--learning_rte", "1e-3")
flags_fault("network_args_value", FLAGS, "--network_args conv_dim=abc", "--network_args", "conv_dim=abc")
flags_fault("network_args_form", FLAGS, "--network_args without key=value (conv_dim)", "--network_args", "conv_dim")
flags_fault("network_args_unknown", FLAGS, "--network_args with an unknown key", "--network_args", "no_such_arg=1")
flags_fault("optimizer_unknown", FLAGS, "--optimizer_type NoSuchOptimizer", "--optimizer_type", "NoSuchOptimizer")
flags_fault("resolution_text", FLAGS, "--resolution abc", "--resolution", "abc")
flags_fault("mixed_precision_choice", FLAGS, "--mixed_precision fp8", "--mixed_precision", "fp8")
flags_fault(
    "unet_and_te_only",
    FLAGS,
    "--network_train_unet_only with --network_train_text_encoder_only",
    "--network_train_text_encoder_only",
)

# Missing things ----------------------------------------------------------------------------------------------------
MISSING = "missing path"


@fault("missing_data", MISSING, "--train_data_dir does not exist")
def _missing_data(case: Case) -> Action:
    return lambda: case.train(case.argv(data=case.root / "no_such_folder"))


@fault("empty_data", MISSING, "--train_data_dir has no images")
def _empty_data(case: Case) -> Action:
    (case.inputs / "empty").mkdir(parents=True)
    return lambda: case.train(case.argv(data=case.inputs / "empty"))


@fault("missing_model", MISSING, "--pretrained_model_name_or_path does not exist")
def _missing_model(case: Case) -> Action:
    return lambda: case.train(case.argv(model=case.root / "no_such_model.safetensors"))


@fault("missing_resume", MISSING, "--resume folder does not exist")
def _missing_resume(case: Case) -> Action:
    return lambda: case.train(case.argv("--resume", str(case.out / "no_such-state")))


@fault("missing_weights", MISSING, "--network_weights file does not exist")
def _missing_weights(case: Case) -> Action:
    return lambda: case.train(case.argv("--network_weights", str(case.root / "no_such_lora.safetensors")))


@fault("missing_config", MISSING, "--config_file does not exist")
def _missing_config(case: Case) -> Action:
    return lambda: case.train(case.argv("--config_file", str(case.root / "no_such.toml")))


IMAGES = "broken image"


@fault("image_garbage", IMAGES, "an image file of random bytes")
def _image_garbage(case: Case) -> Action:
    damage(sorted(case.data.rglob("*.png"))[1], "garbage")
    return lambda: case.train(case.argv())


@fault("image_truncated", IMAGES, "an image cut in half, its caches removed")
def _image_truncated(case: Case) -> Action:
    image = sorted(case.data.rglob("*.png"))[1]
    for cache in image.parent.glob(f"{image.stem}_*.npz"):
        cache.unlink()
    damage(image, "truncated")
    return lambda: case.train(case.argv())
