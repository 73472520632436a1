"""Loading SDXL offline: the tiny model's single file and diffusers folder read back exactly, config-folder
resolution, the cheap path check and the sd-scripts model hashes. (The streaming loader's own tests - equality with
diffusers' loader, dtypes, memory - are in test_model_loading.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch

from library.errors import UserInputError
from library.model.loading import SHIPPED_CONFIG_DIR, check_model_path, load_sdxl, model_hashes, resolve_config_dir

COMPONENTS = [
    ("unet", "unet"),
    ("vae", "vae"),
    ("text_encoder", "text_encoder1"),
    ("text_encoder_2", "text_encoder2"),
]


@pytest.fixture(scope="module")
def reference():
    """The tiny model's components as built before writing (same seed as the session fixture)."""
    from tools.make_tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


def test_single_file_round_trip_is_exact(tiny_sdxl, tiny_models, reference):
    """Our original-layout file, read back by ``load_sdxl``, gives every tensor of the built model unchanged."""
    assert tiny_models.is_single_file and tiny_models.config_dir == tiny_sdxl.diffusers_dir
    for ref_name, loaded_name in COMPONENTS:
        expected = getattr(reference, ref_name).state_dict()
        loaded = getattr(tiny_models, loaded_name).state_dict()
        assert set(loaded) == set(expected), ref_name
        for key, tensor in expected.items():
            assert loaded[key].device.type == "cpu", key  # a key diffusers did not fill stays on "meta"
            assert loaded[key].dtype == torch.float32
            assert torch.equal(loaded[key], tensor), key


def test_tiny_config_numbers(tiny_models):
    unet, vae = tiny_models.unet.config, tiny_models.vae.config
    assert list(unet.block_out_channels) == [32, 64, 128]
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.layers_per_block == 2 and unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == 32 + 64
    assert unet.projection_class_embeddings_input_dim == 64 + 6 * 256
    assert len(vae.block_out_channels) == 4 and vae.latent_channels == 4 and vae.scaling_factor == 0.13025
    assert tiny_models.text_encoder1.config.num_hidden_layers >= 12
    assert tiny_models.text_encoder2.config.num_hidden_layers >= 10
    assert tiny_models.text_encoder1.config.hidden_act == "quick_gelu"


def test_folder_and_single_file_give_the_same_unet_output(tiny_sdxl, tiny_models):
    folder = load_sdxl(tiny_sdxl.diffusers_dir)
    assert not folder.is_single_file and folder.config_dir == tiny_sdxl.diffusers_dir
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 96, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 64, generator=gen),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2),
    }
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        a = tiny_models.unet(latents, timesteps, context, added_cond_kwargs=added).sample
        b = folder.unet(latents, timesteps, context, added_cond_kwargs=added).sample
    assert a.shape == (2, 4, 16, 16)
    assert torch.equal(a, b)


def test_load_touches_no_network_and_honours_dtype(tiny_sdxl, no_network):
    models = load_sdxl(tiny_sdxl.single_file, dtype=torch.float16)
    for _, name in COMPONENTS:
        assert {p.dtype for p in getattr(models, name).parameters()} == {torch.float16}
    assert load_sdxl(tiny_sdxl.diffusers_dir).unet.dtype == torch.float32


def test_explicit_config_dir_loads_a_file_without_a_beside_folder(tiny_sdxl, tmp_path, no_network):
    lonely = tmp_path / "renamed.safetensors"
    shutil.copyfile(tiny_sdxl.single_file, lonely)
    assert resolve_config_dir(lonely) == SHIPPED_CONFIG_DIR
    models = load_sdxl(lonely, config_dir=tiny_sdxl.diffusers_dir)
    assert models.config_dir == tiny_sdxl.diffusers_dir
    assert list(models.unet.config.block_out_channels) == [32, 64, 128]


def test_a_file_that_does_not_fit_the_shipped_configs_is_a_user_error(tiny_sdxl, tmp_path, no_network):
    lonely = tmp_path / "tiny.safetensors"  # no tiny_diffusers/ beside it: the SDXL base configs are used
    shutil.copyfile(tiny_sdxl.single_file, lonely)
    with pytest.raises(UserInputError, match="does not fit the configs in .*configs/sdxl") as info:
        load_sdxl(lonely)
    assert "\n" not in str(info.value)


def _config_folder(path):
    path.mkdir()
    (path / "model_index.json").write_text("{}")
    return path


def test_config_resolution_order(tmp_path):
    model = tmp_path / "my_model.safetensors"
    model.write_bytes(b"")
    assert resolve_config_dir(model) == SHIPPED_CONFIG_DIR
    (tmp_path / "my_model_diffusers").mkdir()  # a folder without model_index.json does not count
    assert resolve_config_dir(model) == SHIPPED_CONFIG_DIR
    config = _config_folder(tmp_path / "my_model_config")
    assert resolve_config_dir(model) == config
    (tmp_path / "my_model_diffusers" / "model_index.json").write_text("{}")
    assert resolve_config_dir(model) == tmp_path / "my_model_diffusers"  # _diffusers before _config
    explicit = _config_folder(tmp_path / "elsewhere")
    assert resolve_config_dir(model, explicit) == explicit  # explicit beats beside
    with pytest.raises(UserInputError, match="no model_index.json"):
        resolve_config_dir(model, tmp_path)


def test_shipped_config_folder_is_complete():
    for sub in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/merges.txt",
    ]:
        assert (SHIPPED_CONFIG_DIR / sub).is_file(), sub
    index = json.loads((SHIPPED_CONFIG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    vae = json.loads((SHIPPED_CONFIG_DIR / "vae/config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    te2 = json.loads((SHIPPED_CONFIG_DIR / "text_encoder_2/config.json").read_text())
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["num_attention_heads"], te2["projection_dim"]) == (
        1280,
        32,
        20,
        1280,
    )
    scheduler = json.loads((SHIPPED_CONFIG_DIR / "scheduler/scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"]) == (0.00085, 0.012, 1)


def _write_safetensors_header(path, names):
    header = json.dumps(
        {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4 * len(names))


def _one_line_error(path):
    with pytest.raises(UserInputError) as info:
        check_model_path(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--pretrained_model_name_or_path: ")
    return message


def test_check_model_path_accepts_both_layouts(tiny_sdxl):
    check_model_path(tiny_sdxl.single_file)
    check_model_path(str(tiny_sdxl.diffusers_dir))


def test_check_model_path_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert _one_line_error(missing) == (
        f"--pretrained_model_name_or_path: no such file or folder: {missing} "
        "(give an SDXL .safetensors single file or a diffusers folder)"
    )
    assert "Hub repo ids are not downloaded" in _one_line_error("stabilityai/stable-diffusion-xl-base-1.0")

    (tmp_path / "model.bin").write_bytes(b"x")
    assert "is not a .safetensors or .ckpt file" in _one_line_error(tmp_path / "model.bin")

    (tmp_path / "folder").mkdir()
    assert "folder without model_index.json" in _one_line_error(tmp_path / "folder")

    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    assert _one_line_error(tmp_path / "junk.safetensors") == (
        f"--pretrained_model_name_or_path: {tmp_path / 'junk.safetensors'}: not a safetensors file (too short); "
        "the file is damaged or not a model: download or convert it again"
    )

    lora = tmp_path / "lora.safetensors"
    _write_safetensors_header(lora, ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"])
    assert "is it a LoRA or a VAE" in _one_line_error(lora)

    sd15 = tmp_path / "sd15.safetensors"
    _write_safetensors_header(
        sd15,
        [
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ],
    )
    assert "not an SDXL checkpoint" in _one_line_error(sd15)


def test_model_hashes_of_known_bytes(tmp_path):
    small = tmp_path / "abc.ckpt"
    small.write_bytes(b"abc")
    # shorter than 1 MiB: sd-scripts' legacy hash reads nothing there, i.e. hashes b"" (sha256 e3b0c442...)
    assert model_hashes(small) == ("e3b0c442", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")

    big = tmp_path / "big.safetensors"
    window = bytes(range(256)) * 256  # the 64 KiB at offset 1 MiB
    big.write_bytes(b"\0" * 0x100000 + window + b"tail")
    legacy, full = model_hashes(big)
    assert legacy == hashlib.sha256(window).hexdigest()[:8]
    assert full == hashlib.sha256(big.read_bytes()).hexdigest()
    assert legacy != "e3b0c442" and len(full) == 64


def test_model_hashes_of_a_folder(tmp_path):
    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    (a / "model_index.json").write_text("{}")
    (a / "unet" / "w.safetensors").write_bytes(b"weights")
    legacy, full = model_hashes(a)
    assert legacy == full[:8] and len(full) == 64
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert model_hashes(b) == (legacy, full)  # independent of the folder's own name
    (b / "unet" / "w.safetensors").write_bytes(b"weightz")
    assert model_hashes(b) != (legacy, full)


def test_streaming_safetensors_writer_reads_back(tmp_path):
    from safetensors.torch import load_file

    from tools.make_tiny_sdxl import write_safetensors_streaming

    tensors = {"b.weight": torch.randn(3, 5), "a": torch.tensor(2.5), "c.bias": torch.arange(7.0)}
    path = tmp_path / "s.safetensors"
    write_safetensors_streaming(path, {k: v.shape for k, v in tensors.items()}, torch.float16, lambda n, s: tensors[n])
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == torch.float16 and torch.equal(loaded[key], tensor.half()), key
