"""The streaming SDXL loader: meta-device models filled one tensor at a time.

- It gives exactly what diffusers' own single-file loader gives (single file, diffusers folder, .ckpt, fp16
  variants, shards, .bin);
- the per-tensor target dtypes (fp16 everywhere, fp8 / fp16 Linear+Conv2d storage, the VAE's own dtype);
- one-line errors for a file that lacks a tensor or has one in another shape;
- no socket while loading;
- peak memory, measured in a subprocess on a ~420 MB fp16 file: about one copy of the loaded weights, never the
  second copy (2x for fp16 -> fp32) a whole-file load makes;
- the reader (safetensors dtypes and row reads, pickles, shard indexes) and the per-tensor key sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserInputError
from library.files.weight_files import TensorReader, find_component_weights
from library.model.loading import load_sdxl
from networks.sdxl_keys import TensorSource, single_file_source, te2_source

REPO_ROOT = Path(__file__).resolve().parents[1]
# (diffusers pipeline attribute, SDXLModels attribute)
COMPONENTS = [
    ("unet", "unet"),
    ("vae", "vae"),
    ("text_encoder", "text_encoder1"),
    ("text_encoder_2", "text_encoder2"),
]
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def diffusers_load(tiny_sdxl):
    """The tiny single file as diffusers' own ``from_single_file`` loads it (the reference)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(tiny_sdxl.single_file), config=str(tiny_sdxl.diffusers_dir), local_files_only=True
    )


def assert_same_as_diffusers(models, reference) -> None:
    """Every state-dict tensor of the four models equals the reference's: same names, dtype, values, device."""
    for ref_name, name in COMPONENTS:
        expected = getattr(reference, ref_name).state_dict()
        loaded = getattr(models, name).state_dict()
        assert list(loaded) == list(expected), name
        for key, tensor in expected.items():
            assert loaded[key].device.type == "cpu", key
            assert loaded[key].dtype == tensor.dtype, key
            assert torch.equal(loaded[key], tensor), key
        assert not getattr(models, name).training, name


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}


# --- Same tensors as diffusers' loader -----------------------------------------------------------------------------
def test_single_file_load_equals_diffusers_from_single_file(tiny_models, diffusers_load):
    assert_same_as_diffusers(tiny_models, diffusers_load)
    assert type(tiny_models.scheduler) is type(diffusers_load.scheduler)
    assert dict(tiny_models.scheduler.config) == dict(diffusers_load.scheduler.config)
    assert tiny_models.tokenizer2("a photo").input_ids == diffusers_load.tokenizer_2("a photo").input_ids
    buffers = dict(tiny_models.text_encoder1.named_buffers())
    assert buffers["embeddings.position_ids"].dtype == torch.int64
    assert buffers["embeddings.position_ids"][0, -1].item() == 76


def test_diffusers_folder_load_equals_diffusers_from_single_file(tiny_sdxl, diffusers_load):
    assert_same_as_diffusers(load_sdxl(tiny_sdxl.diffusers_dir), diffusers_load)


def test_ckpt_single_file_with_state_dict_wrapper(tiny_sdxl, tmp_path, diffusers_load):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_sdxl.single_file), "global_step": 7}, ckpt)
    assert_same_as_diffusers(load_sdxl(ckpt, config_dir=tiny_sdxl.diffusers_dir), diffusers_load)


def _shard(file: Path) -> None:
    """Split a safetensors file into two shards with a ``.index.json`` and remove the original."""
    tensors = load_file(file)
    keys = sorted(tensors)
    halves = {f"{file.stem}-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, names in halves.items():
        save_file({k: tensors[k] for k in names}, file.parent / name)
    weight_map = {k: name for name, names in halves.items() for k in names}
    (file.parent / f"{file.name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    file.unlink()


def test_diffusers_folder_variants_shards_and_bin(tiny_sdxl, tmp_path, diffusers_load):
    """fp16-variant file name (used only when there is no plain file), a sharded text encoder, a .bin VAE."""
    folder = tmp_path / "variants"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    _shard(folder / "text_encoder_2" / "model.safetensors")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae), vae.with_name("diffusion_pytorch_model.bin"))
    vae.unlink()
    assert find_component_weights(folder / "unet").name == "diffusion_pytorch_model.fp16.safetensors"
    assert find_component_weights(folder / "text_encoder_2").name == "model.safetensors.index.json"
    assert_same_as_diffusers(load_sdxl(folder), diffusers_load)


def test_plain_weights_are_preferred_to_the_fp16_variant(tmp_path):
    for name in [
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
    ]:
        (tmp_path / name).write_bytes(b"")
    assert find_component_weights(tmp_path).name == "diffusion_pytorch_model.safetensors"
    assert find_component_weights(tmp_path / "nothing") is None


# --- Target dtypes -------------------------------------------------------------------------------------------------
def test_fp16_everywhere(tiny_sdxl, diffusers_load):
    models = load_sdxl(tiny_sdxl.single_file, dtype=torch.float16)
    for ref_name, name in COMPONENTS:
        expected = getattr(diffusers_load, ref_name).state_dict()
        for key, tensor in getattr(models, name).state_dict().items():
            assert tensor.dtype == torch.float16, (name, key)
            assert torch.equal(tensor, expected[key].half()), (name, key)
    assert dict(models.text_encoder2.named_buffers())["text_model.embeddings.position_ids"].dtype == torch.int64


def test_fp8_unet_linear_and_conv_weights(tiny_sdxl, diffusers_load):
    models = load_sdxl(tiny_sdxl.single_file, dtype=torch.float32, linear_weight_dtypes={"unet": FP8})
    unet = models.unet
    fp8_names = linear_weight_names(unet)
    assert len(fp8_names) > 100
    expected = diffusers_load.unet.state_dict()
    dtypes = {}
    for key, tensor in unet.state_dict().items():
        dtypes[key] = tensor.dtype
        target = FP8 if key in fp8_names else torch.float32
        assert tensor.dtype == target, key
        assert torch.equal(tensor.float(), expected[key].to(target).float()), key
    # norms, embeddings and biases stay in `dtype`; so do the other components
    assert dtypes["conv_in.weight"] == FP8 and dtypes["conv_in.bias"] == torch.float32
    assert dtypes["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == FP8
    assert dtypes["down_blocks.1.attentions.0.norm.weight"] == torch.float32
    assert dtypes["time_embedding.linear_1.weight"] == FP8 and dtypes["time_embedding.linear_1.bias"] == torch.float32
    for _, name in COMPONENTS[1:]:
        assert {p.dtype for p in getattr(models, name).parameters()} == {torch.float32}, name


def test_fp16_storage_of_text_encoder_weights_with_fp32_compute(tiny_sdxl):
    halves = {"text_encoder1": torch.float16, "text_encoder2": torch.float16}
    models = load_sdxl(tiny_sdxl.single_file, linear_weight_dtypes=halves)
    for te in (models.text_encoder1, models.text_encoder2):
        linear = linear_weight_names(te)
        for key, param in te.named_parameters():
            assert param.dtype == (torch.float16 if key in linear else torch.float32), key
    te2 = dict(models.text_encoder2.named_parameters())
    assert te2["text_projection.weight"].dtype == torch.float16
    assert te2["text_model.embeddings.token_embedding.weight"].dtype == torch.float32
    assert te2["text_model.encoder.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    assert {p.dtype for p in models.unet.parameters()} == {torch.float32}


def test_vae_dtype(tiny_sdxl):
    models = load_sdxl(tiny_sdxl.single_file, dtype=torch.float16, vae_dtype=torch.float32)
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in models.unet.parameters()} == {torch.float16}
    folder = load_sdxl(tiny_sdxl.diffusers_dir, vae_dtype=torch.bfloat16)
    assert {p.dtype for p in folder.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in folder.text_encoder2.parameters()} == {torch.float32}


def test_linear_weight_dtypes_of_an_unknown_component_are_rejected(tiny_sdxl):
    with pytest.raises(ValueError, match="unknown components \\['vae'\\]"):
        load_sdxl(tiny_sdxl.single_file, linear_weight_dtypes={"vae": FP8})


# --- A file that does not fit --------------------------------------------------------------------------------------
def _edited_copy(tiny_sdxl, tmp_path, edit) -> Path:
    tensors = load_file(tiny_sdxl.single_file)
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path)
    return path


def _one_line_error(path, config_dir) -> str:
    with pytest.raises(UserInputError) as info:
        load_sdxl(path, config_dir=config_dir)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--pretrained_model_name_or_path: {path} does not fit")
    assert message.endswith("put its diffusers config folder beside it as edited_diffusers")
    return message


def test_a_file_missing_a_unet_tensor_is_one_line_error(tiny_sdxl, tmp_path):
    key = "model.diffusion_model.output_blocks.2.2.conv.weight"
    path = _edited_copy(tiny_sdxl, tmp_path, lambda t: t.pop(key))
    assert f"(unet: no tensor {key})" in _one_line_error(path, tiny_sdxl.diffusers_dir)


def test_a_tensor_of_the_wrong_shape_is_one_line_error(tiny_sdxl, tmp_path):
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    path = _edited_copy(tiny_sdxl, tmp_path, lambda t: t.__setitem__(key, torch.zeros(128, 64)))
    assert f"(unet: {key} gives shape [128, 64], the config needs [128, 128])" in _one_line_error(
        path, tiny_sdxl.diffusers_dir
    )


def test_a_short_te2_fused_projection_is_one_line_error(tiny_sdxl, tmp_path):
    key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    path = _edited_copy(tiny_sdxl, tmp_path, lambda t: t.__setitem__(key, t[key][:96]))
    assert f"text_encoder2: {key} gives shape [32, 64], the config needs [64, 64]" in _one_line_error(
        path, tiny_sdxl.diffusers_dir
    )


def test_a_folder_whose_weights_do_not_fit_its_config(tiny_sdxl, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, vae)
    pattern = r"vae/diffusion_pytorch_model.safetensors does not fit .*vae/config.json \(no tensor decoder.conv_out"
    with pytest.raises(UserInputError, match=pattern):
        load_sdxl(folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserInputError, match="vae holds no weights"):
        load_sdxl(folder)


# --- Offline -------------------------------------------------------------------------------------------------------
def test_loading_opens_no_socket(tiny_sdxl, no_network):
    assert load_sdxl(tiny_sdxl.single_file, linear_weight_dtypes={"unet": FP8}).unet.conv_in.weight.dtype == FP8
    assert load_sdxl(tiny_sdxl.diffusers_dir).vae.dtype == torch.float32


# --- Peak memory ---------------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, resource, sys
import torch
import accelerate, diffusers, transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
import library.files.weight_files
from library.model.loading import load_sdxl

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

before = status_kib("VmRSS") * 1024
dtypes = {"fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
linear = {c: dtypes[sys.argv[3]] for c in ("unet", "text_encoder1", "text_encoder2")} if sys.argv[3] else None
models = load_sdxl(sys.argv[1], dtype=dtypes[sys.argv[2]], linear_weight_dtypes=linear)
weights = sum(p.numel() * p.element_size() for m in (models.unet, models.vae, models.text_encoder1,
              models.text_encoder2) for p in m.parameters())
print(json.dumps({"peak_increase": status_kib("VmHWM") * 1024 - before, "weights": weights,
                  "ru_maxrss_increase": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}))
"""


def measure_load(path: Path, dtype: str, linear: str = "") -> dict[str, int]:
    """Peak RSS increase of ``load_sdxl`` in a fresh process - its peak RSS after loading minus its RSS after the
    imports - and the loaded parameters' bytes.

    The peak is the process's own high-water mark (VmHWM). ``ru_maxrss`` would do in a process started from a
    shell, but it also carries the peak RSS of the process that spawned it (the kernel keeps the larger of the two
    over fork/vfork + exec), so under pytest it reads at least pytest's own peak: it is reported, not asserted.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), dtype, linear],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mid_file(tmp_path_factory) -> Path:
    """The ~420 MB fp16 mid-size SDXL single file with its config folder beside it."""
    from tools.make_tiny_sdxl import write_mid_sdxl

    return write_mid_sdxl(tmp_path_factory.mktemp("mid_sdxl"), torch.float16)


MIB = 2**20


@pytest.mark.slow
def test_fp16_file_to_fp16_peaks_at_about_one_copy(mid_file):
    size = mid_file.stat().st_size
    assert 300 * MIB < size < 500 * MIB
    measured = measure_load(mid_file, "fp16")
    assert abs(measured["weights"] - size) < MIB  # every tensor loaded, none converted
    assert measured["peak_increase"] <= 1.3 * size + 64 * MIB, measured  # a second copy would be 2x


@pytest.mark.slow
def test_fp16_file_to_fp8_linear_weights_peaks_well_below_the_fp16_size(mid_file):
    size = mid_file.stat().st_size
    measured = measure_load(mid_file, "fp16", "fp8")
    assert measured["weights"] < 0.65 * size  # Linear/Conv2d weights (~80% of the bytes) halved
    assert measured["peak_increase"] <= measured["weights"] + 64 * MIB, measured
    assert measured["peak_increase"] < 0.8 * size, measured


@pytest.mark.slow
def test_the_measurement_sees_a_full_fp32_copy(mid_file):
    """Control: loading the same file to fp32 must show the 2x it really costs (the measure is not blind)."""
    size = mid_file.stat().st_size
    measured = measure_load(mid_file, "fp32")
    assert measured["peak_increase"] >= 1.95 * size, measured


# --- The reader ----------------------------------------------------------------------------------------------------
def test_reader_reads_every_safetensors_dtype_and_row_ranges(tmp_path):
    tensors = {
        "f32": torch.randn(6, 3),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "f8_e4m3": torch.randn(3, 4).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(2, 2).to(torch.float8_e5m2),
        "i64": torch.arange(77).reshape(1, 77),
        "i32": torch.arange(5, dtype=torch.int32),
        "scalar": torch.tensor(4.6052),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    with TensorReader(path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            assert reader.shape(key) == tuple(tensor.shape) and reader.dtype(key) == tensor.dtype, key
            read = reader.read(key)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape, key
            assert torch.equal(read.float(), tensor.float()), key
        assert torch.equal(reader.read("f32", rows=(2, 4)), tensors["f32"][2:4])
        assert reader.read("f16", rows=(4, 4)).shape == (0, 2)
        with pytest.raises(ValueError, match="out of range"):
            reader.read("f32", rows=(4, 7))


def test_reader_reads_are_independent_of_each_other_and_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, path)
    with TensorReader(path) as reader:
        a, b = reader.read("w"), reader.read("w")
    a.add_(1)
    assert torch.equal(b, torch.ones(4)) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_reader_pickles_and_shards(tmp_path):
    tensors = {"a.weight": torch.randn(6, 2), "b": torch.arange(3)}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "epoch": 3}, ckpt)
    with TensorReader(ckpt) as reader:
        assert sorted(reader.keys()) == ["a.weight", "b"]
        assert torch.equal(reader.read("a.weight", rows=(3, 6)), tensors["a.weight"][3:])
    single = tmp_path / "model.safetensors"
    save_file(tensors, single)
    _shard(single)
    with TensorReader(tmp_path / "model.safetensors.index.json") as reader:
        assert sorted(reader.keys()) == ["a.weight", "b"]
        assert torch.equal(reader.read("b"), tensors["b"])


def test_reader_errors_are_user_errors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserInputError, match=r"truncated \(3,972 of its 4,072 bytes"):  # found on opening it
        TensorReader(path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(UserInputError, match="not a readable weights-only torch checkpoint"):
        TensorReader(tmp_path / "junk.ckpt")
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(UserInputError, match="shard gone.safetensors is missing"):
        TensorReader(tmp_path / "m.safetensors.index.json")


# --- Per-tensor key sources ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "source"),
    [
        (
            "text_model.encoder.layers.3.self_attn.q_proj.weight",
            TensorSource("transformer.resblocks.3.attn.in_proj_weight", qkv_index=0),
        ),
        (
            "text_model.encoder.layers.3.self_attn.v_proj.bias",
            TensorSource("transformer.resblocks.3.attn.in_proj_bias", qkv_index=2),
        ),
        (
            "text_model.encoder.layers.0.self_attn.out_proj.weight",
            TensorSource("transformer.resblocks.0.attn.out_proj.weight"),
        ),
        ("text_model.encoder.layers.31.mlp.fc1.bias", TensorSource("transformer.resblocks.31.mlp.c_fc.bias")),
        ("text_model.encoder.layers.9.layer_norm2.weight", TensorSource("transformer.resblocks.9.ln_2.weight")),
        ("text_model.embeddings.position_embedding.weight", TensorSource("positional_embedding")),
        ("text_model.final_layer_norm.bias", TensorSource("ln_final.bias")),
        ("text_projection.weight", TensorSource("text_projection", transpose=True)),
    ],
)
def test_te2_sources(name, source):
    assert te2_source(name) == source


def test_te2_source_rejects_unknown_names():
    with pytest.raises(ValueError, match="TE2"):
        te2_source("text_model.encoder.layers.0.extra.weight")


def test_tensor_source_rows_shapes_and_derivation():
    k = TensorSource("in_proj_weight", qkv_index=1)
    assert k.rows((3840, 1280)) == (1280, 2560) and k.shape((3840, 1280)) == (1280, 1280)
    assert k.shape((3840,)) == (1280,)
    proj = TensorSource("text_projection", transpose=True)
    stored = torch.arange(6.0).reshape(2, 3)
    assert proj.shape((2, 3)) == (3, 2)
    derived = proj.derive(stored)
    assert torch.equal(derived, stored.T) and derived.is_contiguous()
    attention = single_file_source("vae", "encoder.mid_block.attentions.0.to_q.weight")
    assert attention == TensorSource("first_stage_model.encoder.mid.attn_1.q.weight", squeeze_1x1=True)
    assert attention.shape((512, 512, 1, 1)) == (512, 512)
    assert attention.derive(torch.ones(4, 4, 1, 1)).shape == (4, 4)
    assert attention.shape((512, 512)) == (512, 512)  # a file already in the Linear layout is taken as it is
    assert not single_file_source("vae", "encoder.mid_block.attentions.0.to_q.bias").squeeze_1x1


def test_single_file_sources_of_each_section():
    assert single_file_source("unet", "up_blocks.0.upsamplers.0.conv.weight").key == (
        "model.diffusion_model.output_blocks.2.2.conv.weight"
    )
    assert single_file_source("text_encoder1", "encoder.layers.0.self_attn.q_proj.weight").key == (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    te2 = single_file_source("text_encoder2", "text_model.encoder.layers.2.self_attn.k_proj.weight")
    assert te2 == TensorSource("conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight", 1)
    assert single_file_source("vae", "decoder.up_blocks.0.resnets.0.conv1.weight").key == (
        "first_stage_model.decoder.up.3.block.0.conv1.weight"
    )
    with pytest.raises(ValueError, match="not an SDXL component"):
        single_file_source("refiner", "x")
