"""The command line the end-to-end tests share: the tiny model at 64 px buckets, no workers, a fixed seed."""

from __future__ import annotations

from pathlib import Path


def tiny_train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--network_module",
        "networks.lora",
        "--resolution",
        "64",
        "--enable_bucket",
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        "128",
        "--caption_extension",
        ".txt",
        "--train_batch_size",
        "2",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "42",
        *extra,
    ]
