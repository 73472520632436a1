"""One caching pass for all processes (`library.data.process_share`): with 2 processes over gloo every cache file is
written exactly once and by the process that encoded it, every item is encoded once, and every process ends with
the content one process makes; files that fit are read, not rewritten. Then a 2-process training run (torchrun) whose
validation loss is the one process's number."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from library.data.dataset import DatasetConfig, TrainDataset, scan_train_data_dir
from library.data.latent_cache import cache_latents
from library.data.process_share import ProcessShare, _rounds
from library.data.text_encoder_cache import cache_text_encoder_outputs
from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
IMAGES = 7
VARIANTS = 2


# --- the share, alone ---------------------------------------------------------------------------------------------


def test_shares_cover_the_work_once_and_differ_by_at_most_one():
    work = list(range(11))
    shares = [ProcessShare(rank, 3, gather=list).mine(work) for rank in range(3)]
    assert sorted(sum(shares, [])) == work
    assert [len(share) for share in shares] == [4, 4, 3]
    with pytest.raises(ValueError):
        ProcessShare(3, 3)


def test_exchange_rounds_are_bounded_and_cut_the_same_everywhere():
    sizes = {"a": 60, "b": 50, "c": 10, "d": 200, "e": 1}
    assert _rounds(list(sizes), sizes.__getitem__, 100) == [["a"], ["b", "c"], ["d"], ["e"]]


def test_one_process_agrees_with_itself_and_exchanges_nothing():
    alone = ProcessShare()
    assert alone.agree([3, 1, 3]) == [1, 3]
    assert alone.exchange([1, 3], {1: "x", 3: "y"}, lambda key: 1) == {1: "x", 3: "y"}


# --- two processes over gloo, the caches alone ----------------------------------------------------------------------


def _config(root: Path) -> DatasetConfig:
    return DatasetConfig(
        root,
        caption_extension=".txt",
        resolution=(64, 64),
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        flip_aug=True,
        shuffle_caption=True,
    )


def _encode_image(images: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def _encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([float(sum(map(ord, caption)) % 997) for caption in captions])
    context = values[:, None, None] + torch.arange(25, dtype=torch.float32).reshape(1, 5, 5)
    return context, torch.stack([values, -values], dim=1)


def _one_pass(root: Path, share: ProcessShare, to_disk: bool, log: dict) -> dict:
    """Cache the latents and text-encoder outputs of `root`'s images; what this process encoded is added to `log`."""
    dataset = TrainDataset(scan_train_data_dir(_config(root)), _config(root))

    def encode_image(images):
        log["images"] += images.shape[0]
        return _encode_image(images)

    def encode_text(captions):
        log["captions"] += captions
        return _encode_text(captions)

    latents = cache_latents(dataset, encode_image, to_disk=to_disk, batch_size=2, show_progress=False, share=share)
    text = cache_text_encoder_outputs(
        [record.path for record in dataset.records],
        lambda index, epoch: dataset.caption(index, epoch),
        encode_text,
        num_variants=VARIANTS,
        seed=1,
        length=5,
        te1_width=3,
        to_disk=to_disk,
        model="fake",
        share=share,
    )
    return {
        "latents": dict(dataset._latents),
        "flipped": dict(dataset._latents_flipped),
        "text": text.outputs,
        "passes": (latents, text.made),
    }


def _rank_main(rank: int, world: int, init: str, root: str, out: str) -> None:
    """One process: a disk pass (files missing), a disk pass after two files are lost or damaged, a memory pass."""
    import library.data.latent_cache as latent_cache
    import library.data.text_encoder_cache as text_cache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    writes: Counter = Counter()

    def counting(write):
        def wrapper(target, arrays, **kwargs):
            writes[str(target)] += 1
            write(target, arrays, **kwargs)

        return wrapper

    latent_cache.write_npz_atomic = counting(latent_cache.write_npz_atomic)
    text_cache.write_npz_atomic = counting(text_cache.write_npz_atomic)

    def gather(items: list) -> list:
        gathered = [None] * world
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]

    share = ProcessShare(rank, world, gather)
    results = []
    for name in ("first", "repaired", "memory"):
        if name == "repaired":  # every process has read every file of the first pass; one process breaks two
            dist.barrier()
            if rank == 0:
                min(Path(root).rglob("*_sdxl.npz")).unlink()
                min(Path(root).rglob("*_te_outputs.npz")).write_bytes(b"broken")
            dist.barrier()
        log = {"images": 0, "captions": []}
        writes.clear()
        result = _one_pass(Path(root), share, to_disk=name != "memory", log=log)
        results.append({**result, "log": log, "writes": dict(writes)})
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _same(a: dict, b: dict) -> bool:
    """Whether two caches (index -> tensor, or index -> [(context, pooled), ...]) hold the same values, bit for bit."""

    def flat(value) -> list[torch.Tensor]:
        return [value] if isinstance(value, torch.Tensor) else [t for pair in value for t in pair]

    return a.keys() == b.keys() and all(
        len(flat(a[k])) == len(flat(b[k])) and all(map(torch.equal, flat(a[k]), flat(b[k]))) for k in a
    )


@pytest.mark.slow
def test_two_processes_share_the_caching_and_write_every_file_once(tmp_path):
    make_demo_dataset(tmp_path / "data", count=IMAGES, min_side=48, max_side=112, repeats=1, name="toy", seed=0)
    shutil.copytree(tmp_path / "data", tmp_path / "alone")
    reference = _one_pass(tmp_path / "alone", ProcessShare(), to_disk=False, log={"images": 0, "captions": []})
    out = tmp_path / "out"
    out.mkdir()
    init = (tmp_path / "init").as_uri()
    mp.start_processes(_rank_main, args=(2, init, str(tmp_path / "data"), str(out)), nprocs=2, start_method="spawn")
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    latent_files = sorted(str(path) for path in (tmp_path / "data").rglob("*_sdxl.npz"))
    text_files = sorted(str(path) for path in (tmp_path / "data").rglob("*_te_outputs.npz"))
    assert len(latent_files) == len(text_files) == IMAGES

    first, repaired, memory = zip(*ranks)  # each: the two processes' results of that pass
    # Every process ends with the one-process content, in every pass.
    for results in (first, repaired, memory):
        for result in results:
            assert _same(result["latents"], reference["latents"]) and _same(result["flipped"], reference["flipped"])
            assert _same(result["text"], reference["text"])
    # First pass: each file written once, by one process; each image (and its mirror) and caption encoded once.
    writes = Counter(first[0]["writes"]) + Counter(first[1]["writes"])
    assert sorted(writes) == sorted(latent_files + text_files) and set(writes.values()) == {1}
    assert first[0]["writes"].keys().isdisjoint(first[1]["writes"])
    assert [r["log"]["images"] for r in first] == [IMAGES + 1, IMAGES - 1]  # 7 images + 7 mirrors, split 4/3
    captions = first[0]["log"]["captions"] + first[1]["log"]["captions"]
    assert len(captions) == len(set(captions)) == first[0]["passes"][1].encoded > IMAGES  # variants differ
    assert [r["passes"][0].encoded_here for r in first] == [4, 3]
    # After one latent file was lost and one text-encoder file damaged: exactly those two are rewritten, once.
    repaired_writes = Counter(repaired[0]["writes"]) + Counter(repaired[1]["writes"])
    assert sorted(repaired_writes) == [latent_files[0], text_files[0]] and set(repaired_writes.values()) == {1}
    assert sum(r["log"]["images"] for r in repaired) == 2  # one image and its mirror
    assert 1 <= sum(len(r["log"]["captions"]) for r in repaired) <= VARIANTS  # its variants (two may be equal)
    assert all(r["passes"][0].from_files == r["passes"][1].from_files == IMAGES - 1 for r in repaired)
    # In memory: nothing written, the images still split between the processes.
    assert not memory[0]["writes"] and not memory[1]["writes"]
    assert [r["log"]["images"] for r in memory] == [IMAGES + 1, IMAGES - 1]
    assert not list((tmp_path / "data").rglob("*.tmp"))


# --- a 2-process training run: caching and validation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lora(tiny_models, tmp_path_factory) -> Path:
    """A UNet LoRA with non-zero up weights, so the validation loss depends on it."""
    from networks.lora import create_network

    path = tmp_path_factory.mktemp("lora") / "random.safetensors"
    models = tiny_models
    text_encoders = [models.text_encoder1, models.text_encoder2]
    network = create_network(1.0, 4, 1.0, None, text_encoders, models.unet)
    network.apply_to(text_encoders, models.unet, apply_text_encoder=False)  # UNet-only, as the runs train
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(0.0, 0.2, generator=generator)
    network.remove_from_model()
    network.save_weights(path, torch.float32, {"ss_network_dim": "4"})
    return path


def _validation_argv(model: Path, data: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--output_name",
        "val",
        "--resolution",
        "64",
        "--caption_extension",
        ".txt",
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "2",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "3",
        "--network_dim",
        "4",
        "--network_weights",
        str(weights),
        "--network_train_unet_only",
        "--learning_rate",
        "1e-30",  # too small to move a float32 weight: both runs validate the file's LoRA (0 is refused)
        "--validation_split",
        "0.34",
        "--validate_every_n_steps",
        "1",
        "--cache_latents",
        "--cache_text_encoder_outputs",
        *extra,
    ]


def _report_validation(out: Path) -> list[tuple[int, float]]:
    report = json.loads((out / "val_report.json").read_text(encoding="utf-8"))
    return [(int(step), float(loss)) for step, loss in report["history"]["validation"]]


@pytest.mark.slow
def test_two_process_run_caches_once_and_validates_as_one_process(tiny_sdxl, random_lora, tmp_path, capsys):
    import train_network

    make_demo_dataset(tmp_path / "data", count=9, min_side=64, max_side=64, repeats=1, name="toy", seed=0)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    to_disk = ("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")
    argv = _validation_argv(tiny_sdxl.single_file, tmp_path / "data", tmp_path / "two", random_lora, *to_disk)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", str(REPO / "train_network.py"), *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 9 images: 6 train, 3 validate; each pass split 3/3, or 2/1 (printed by the main process).
    assert "cached latents of 6 images" in proc.stdout and "6 images encoded (this process: 3)" in proc.stdout
    assert "cached latents of 3 images" in proc.stdout and "3 images encoded (this process: 2)" in proc.stdout
    files = sorted((tmp_path / "data").rglob("*.npz"))
    assert len(files) == 2 * 9 and not list((tmp_path / "data").rglob("*.tmp"))
    two = _report_validation(tmp_path / "two")

    # One process on the files the two wrote: every file fits (read, none rewritten), the same validation losses.
    stats = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}
    capsys.readouterr()
    one_argv = _validation_argv(tiny_sdxl.single_file, tmp_path / "data", tmp_path / "one", random_lora, *to_disk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: tiny tensors, and more threads spin on a shared CPU
    try:
        assert train_network.main(one_argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "cached latents of 6 images" in printed and "6 read from cache files, 0 images encoded" in printed
    assert "cached text-encoder outputs of 6 images" in printed and "6 read from cache files, 0 captions" in printed
    one = _report_validation(tmp_path / "one")
    assert [step for step, _ in two] == [step for step, _ in one] == [1, 2]
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-5)
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files} == stats
