"""sd-scripts options this trainer does not implement, with sd-scripts' defaults, so that config files written for
sd-scripts (its `--output_config`, the kohya_ss GUI and other front ends) load when those options are off, and are
refused when they are on.

GUI-written files carry every option the GUI knows, mostly at its default (off, None, False, 0, ""). Such a key
changes nothing, so it is accepted and listed in one note; a key set to anything else would change training (or
what is written), which this trainer would not do, so it is refused by name. The table is ours: names and defaults
read from sd-scripts' `train_network.py` / `sdxl_train_network.py` parsers (train_util's add_*_arguments,
deepspeed_utils, custom_train_functions, sai_model_spec, utils' logging flags) at main, 2026-02.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    default: Any
    """sd-scripts' default."""
    needs: str | None = None
    """Another option this one only acts under (e.g. deepspeed's zero_stage): off while that one is off."""
    also_off: tuple[Any, ...] = ()
    """Other values that mean "off" in sd-scripts for this option."""
    any_value: bool = False
    """No value changes what this trainer does (it already behaves so, or the option only tunes speed/logging)."""
    hint: str = ""
    """What to use instead, if anything."""


UNIMPLEMENTED_FLAGS: dict[str, Option] = {
    # models
    "v2": Option(False, hint="this trainer is for SDXL"),
    "tokenizer_cache_dir": Option(None, any_value=True),  # the CLIP tokenizers ship in configs/sdxl
    "vae": Option(None),
    "disable_mmap_load_safetensors": Option(False, any_value=True),  # weights are never memory-mapped here
    "clip_skip": Option(None, also_off=(1,)),
    # ModelSpec metadata written into the file
    **{
        f"metadata_{name}": Option(None)
        for name in (
            "title",
            "author",
            "description",
            "license",
            "tags",
            "usage_hint",
            "thumbnail",
            "merged_from",
            "trigger_phrase",
            "preprocessor",
            "is_negative_embedding",
        )
    },
    "no_metadata": Option(False),
    # console logging
    "console_log_level": Option(None, any_value=True),
    "console_log_file": Option(None),
    "console_log_simple": Option(False, any_value=True),
    # dataset
    "cache_info": Option(False, any_value=True),  # only speeds up sd-scripts' folder scan
    "caption_extention": Option(None, hint="use caption_extension"),
    "secondary_separator": Option(None),
    "enable_wildcard": Option(False),
    "color_aug": Option(False),
    "face_crop_aug_range": Option(None),
    "debug_dataset": Option(False),
    "skip_cache_check": Option(False, any_value=True),  # caches are always checked here, never used stale
    "resize_interpolation": Option(None),
    "token_warmup_min": Option(1),
    "token_warmup_step": Option(0),
    "alpha_mask": Option(False),
    "dataset_class": Option(None),
    "in_json": Option(None),
    "dataset_repeats": Option(1, needs="in_json"),
    "conditioning_data_dir": Option(None),
    "masked_loss": Option(False),
    "weighted_captions": Option(False),
    # Hugging Face upload and resume
    "huggingface_repo_id": Option(None),
    **{
        name: Option(None, needs="huggingface_repo_id")
        for name in ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility")
    },
    "huggingface_token": Option(None, any_value=True),
    "save_state_to_huggingface": Option(False, needs="huggingface_repo_id"),
    "resume_from_huggingface": Option(False),
    "async_upload": Option(False, needs="huggingface_repo_id"),
    # training loop
    "save_n_epoch_ratio": Option(None),
    "ddp_gradient_as_bucket_view": Option(False, any_value=True),  # no DDP wrapper: gradients are averaged here
    "ddp_static_graph": Option(False, any_value=True),
    "fused_backward_pass": Option(False),
    "use_8bit_adam": Option(False, hint='use optimizer_type = "AdamW8bit"'),
    "use_lion_optimizer": Option(False, hint='use optimizer_type = "Lion"'),
    "v_pred_like_loss": Option(None),
    "cpu_offload_checkpointing": Option(False),
    "scale_weight_norms": Option(None),
    "base_weights": Option(None),
    "base_weights_multiplier": Option(None, needs="base_weights"),
    "skip_until_initial_step": Option(False),
    "initial_epoch": Option(None),
    "initial_step": Option(None),
    # trackers
    "wandb_run_name": Option(None),
    "wandb_api_key": Option(None, hint="run `wandb login` or set WANDB_API_KEY instead"),
    "log_tracker_config": Option(None),
    "log_config": Option(False, any_value=True),  # the run's settings are always logged to the trackers
    # DeepSpeed
    "deepspeed": Option(False),
    **{
        name: Option(default, needs="deepspeed")
        for name, default in (
            ("zero_stage", 2),
            ("offload_optimizer_device", None),
            ("offload_optimizer_nvme_path", None),
            ("offload_param_device", None),
            ("offload_param_nvme_path", None),
            ("zero3_init_flag", False),
            ("zero3_save_16bit_model", False),
            ("fp16_master_weights_and_gradients", False),
        )
    },
}
"""sd-scripts' train_network.py / sdxl_train_network.py flags this trainer lacks, by key."""

UNIMPLEMENTED_DATASET_KEYS: dict[str, Option] = {
    "color_aug": Option(False),
    "face_crop_aug_range": Option(None),
    "alpha_mask": Option(False),
    "token_warmup_min": Option(1),
    "token_warmup_step": Option(0),
    "enable_wildcard": Option(False),
    "secondary_separator": Option(None),
    "cache_info": Option(False, any_value=True),
    "metadata_file": Option(None),
    "conditioning_data_dir": Option(None),
    "validation_split": Option(0.0, hint="use --validation_split"),
    "validation_seed": Option(None, needs="validation_split"),
    "network_multiplier": Option(1.0),
    "custom_attributes": Option(None),
    "resize_interpolation": Option(None),
}
"""sd-scripts' `--dataset_config` keys (general, dataset or subset level) this trainer lacks."""


def is_off(table: Mapping[str, Option], key: str, values: Mapping[str, Any]) -> bool:
    """Whether `values[key]` (absent: the default) leaves sd-scripts' behaviour as if the option were not given."""
    option = table[key]
    if option.any_value or key not in values:
        return True
    value = values[key]
    if option.needs is not None and is_off(table, option.needs, values):
        return True
    if _same(value, option.default) or any(_same(value, off) for off in option.also_off):
        return True
    # None cannot be written in TOML: front ends write "", 0, false or an empty list/table for "not set"
    return option.default in (None, False) and value in ("", 0, False, [], {})


def refusal(table: Mapping[str, Option], key: str, value: Any) -> str:
    """One line: the key, its value, and what to do."""
    option = table[key]
    fix = "remove it" if option.default is None else f"remove it or set it to {_toml_value(option.default)}"
    hint = f"; {option.hint}" if option.hint else ""
    return (
        f"'{key}' = {_toml_value(value)} is an sd-scripts option this trainer does not implement and would "
        f"change the run: {fix}{hint}"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
