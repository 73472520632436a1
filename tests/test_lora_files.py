"""LoRA files across tools: our files reproduce text-encoder and UNet outputs when read back (by us and by
diffusers), and older key spellings load the same."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.files.lora_io import load_lora_file, normalize_lora_key
from library.model.text_encoding import encode_prompts, tokenize
from networks.lora import create_network, create_network_from_weights

CAPTIONS = ["toy, red square, simple background", "a photo of a cat"]


@pytest.fixture(scope="module")
def models(tiny_models):
    return copy.deepcopy(tiny_models)


def _encoders(models):
    return [models.text_encoder1, models.text_encoder2]


def _text_outputs(models, text_encoders=None):
    te1, te2 = text_encoders or _encoders(models)
    ids1 = tokenize(models.tokenizer1, CAPTIONS)
    ids2 = tokenize(models.tokenizer2, CAPTIONS)
    with torch.no_grad():
        return encode_prompts(te1, te2, ids1, ids2, models.tokenizer2.eos_token_id)


def _unet_output(unet, models):
    g = torch.Generator().manual_seed(0)
    added = {
        "text_embeds": torch.randn(2, models.text_encoder2.config.projection_dim, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def trained_file(models, tmp_path_factory):
    """A LoRA with random B (as if trained) on both text encoders and the UNet, saved in fp32, with the
    outputs it produces when applied by our own network."""
    network = create_network(1.0, 4, 2.0, None, _encoders(models), models.unet)
    network.apply_to(_encoders(models), models.unet, True, True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.05)
    expected = {"text": _text_outputs(models), "unet": _unet_output(models.unet, models)}
    network.remove_from_model()
    base = {"text": _text_outputs(models), "unet": _unet_output(models.unet, models)}
    path = tmp_path_factory.mktemp("lora") / "trained.safetensors"
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lora"})
    return path, expected, base, network


def _assert_close(actual, expected, base):
    assert (expected - base).abs().max() > 1e-3, "the LoRA must change this output for the check to mean anything"
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4), (actual - expected).abs().max()


@pytest.mark.slow
def test_read_back_reproduces_text_encoder_and_unet_outputs(models, trained_file):
    path, expected, base, _ = trained_file
    network, weights = create_network_from_weights(1.0, path, None, _encoders(models), models.unet)
    network.load_state_dict(weights)
    network.apply_to(_encoders(models), models.unet, True, True)
    try:
        context, pooled = _text_outputs(models)
        unet = _unet_output(models.unet, models)
    finally:
        network.remove_from_model()
    _assert_close(context, expected["text"][0], base["text"][0])
    _assert_close(pooled, expected["text"][1], base["text"][1])
    _assert_close(unet, expected["unet"], base["unet"])


def test_dims_and_alphas_are_inferred_per_module(models, trained_file, tmp_path):
    path, *_ = trained_file
    weights = load_file(str(path))
    name = "lora_unet_middle_block_1_proj_in"
    weights[f"{name}.lora_down.weight"] = torch.zeros(8, weights[f"{name}.lora_down.weight"].shape[1])
    weights[f"{name}.lora_up.weight"] = torch.zeros(weights[f"{name}.lora_up.weight"].shape[0], 8)
    weights[f"{name}.alpha"] = torch.tensor(3.0)
    mixed = tmp_path / "mixed.safetensors"
    save_file(weights, str(mixed))
    network, _ = create_network_from_weights(1.0, mixed, None, _encoders(models), models.unet)
    by_name = {m.lora_name: m for m in network.unet_loras}
    assert by_name[name].lora_dim == 8 and by_name[name].scale == pytest.approx(3.0 / 8)
    other = by_name["lora_unet_input_blocks_4_1_proj_in"]
    assert other.lora_dim == 4 and other.scale == pytest.approx(2.0 / 4)


@pytest.mark.slow
def test_old_text_encoder_names_without_text_model_load_the_same(models, trained_file, tmp_path):
    path, expected, base, _ = trained_file
    old = {}
    for key, value in load_file(str(path)).items():
        for prefix in ("lora_te1_text_model_", "lora_te2_text_model_"):
            if key.startswith(prefix):
                key = prefix.replace("text_model_", "") + key[len(prefix) :]
        old[key] = value
    assert any(k.startswith("lora_te1_encoder_layers_") for k in old)
    old_path = tmp_path / "old.safetensors"
    save_file(old, str(old_path))
    assert (
        normalize_lora_key("lora_te1_encoder_layers_0_mlp_fc1.alpha")
        == "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"
    )
    assert normalize_lora_key("lora_unet_middle_block_1_proj_in.alpha") == "lora_unet_middle_block_1_proj_in.alpha"

    network, weights = create_network_from_weights(1.0, old_path, None, _encoders(models), models.unet)
    assert len(network.text_encoder_loras) == len(trained_file[3].text_encoder_loras)
    network.load_state_dict(weights)
    network.apply_to(_encoders(models), models.unet, True, False)
    try:
        context, pooled = _text_outputs(models)
    finally:
        network.remove_from_model()
    _assert_close(context, expected["text"][0], base["text"][0])


def test_broken_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from library.errors import UserInputError

    with pytest.raises(UserInputError, match="cannot read LoRA file"):
        load_lora_file(bad)


@pytest.mark.slow
def test_diffusers_loads_text_encoder_and_unet_loras_like_ours(models, trained_file, tiny_sdxl):
    """diffusers' load_lora_weights wraps exactly the file's modules in all three models and matches us."""
    from diffusers import StableDiffusionXLPipeline

    path, expected, base, network = trained_file
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl.diffusers_dir, local_files_only=True)
    pipe.load_lora_weights(str(path))

    def wrapped(model):
        return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))

    assert wrapped(pipe.unet) == len(network.unet_loras)
    te1 = [m for m in network.text_encoder_loras if m.lora_name.startswith("lora_te1_")]
    assert wrapped(pipe.text_encoder) == len(te1)
    assert wrapped(pipe.text_encoder_2) == len(network.text_encoder_loras) - len(te1)
    context, pooled = _text_outputs(models, [pipe.text_encoder, pipe.text_encoder_2])
    _assert_close(context, expected["text"][0], base["text"][0])
    _assert_close(pooled, expected["text"][1], base["text"][1])
    _assert_close(_unet_output(pipe.unet, models), expected["unet"], base["unet"])


def test_load_weights_refuses_a_file_of_other_shapes(models, trained_file):
    from library.errors import UserInputError

    path, *_ = trained_file  # dim 4
    network = create_network(1.0, 8, 1.0, None, _encoders(models), models.unet)
    with pytest.raises(UserInputError, match=r"does not fit this network \(\d+ tensors of another rank"):
        network.load_weights(path)
