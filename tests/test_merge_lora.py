"""tools/merge_lora.py on the tiny SDXL: the merged single file computes what base + LoRA computes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.files.lora_merge import lora_target_table, lora_weight_delta, read_safetensors_header
from library.model.loading import load_sdxl
from networks import lora
from tools.merge_lora import main as merge_main

REPO_ROOT = Path(__file__).resolve().parents[1]
# Relative to the largest output magnitude. fp32 end to end: measured ~1e-6 (UNet) and ~1e-6 (text encoders).
RTOL = 1e-5


def _make_lora(models, seed: int, dim: int, alpha: float, **network_args):
    """A LoRA on the tiny model with seeded random down and up matrices (up is zero at init)."""
    torch.manual_seed(seed)
    network = lora.create_network(
        1.0, dim, alpha, models.vae, [models.text_encoder1, models.text_encoder2], models.unet, **network_args
    )
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)
    return network


@pytest.fixture(scope="module")
def models(tiny_models):
    """A private copy: the LoRAs attach to it."""
    return copy.deepcopy(tiny_models)


@pytest.fixture(scope="module")
def lora_files(models, tmp_path_factory):
    """Two saved LoRAs (fp32): A with conv LoRA (conv_dim 2, conv_alpha 1), B a plain one of another rank."""
    folder = tmp_path_factory.mktemp("loras")
    a = _make_lora(models, seed=1, dim=4, alpha=1.0, conv_dim="2", conv_alpha="1")
    b = _make_lora(models, seed=2, dim=8, alpha=4.0)
    a.save_weights(folder / "a.safetensors", torch.float32, {"modelspec.title": "lora a"})
    b.save_weights(folder / "b.safetensors", torch.float32, None)
    return {"a": (a, folder / "a.safetensors"), "b": (b, folder / "b.safetensors")}


def _tokens(tokenizer, text="a photo of a red square"):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def _outputs(m) -> dict[str, torch.Tensor]:
    """UNet output and the three text-encoder outputs the trainer uses."""
    h1 = m.text_encoder1(_tokens(m.tokenizer1), output_hidden_states=True).hidden_states[11]
    out2 = m.text_encoder2(_tokens(m.tokenizer2), output_hidden_states=True)
    g = torch.Generator().manual_seed(0)
    unet = m.unet
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, m.text_encoder2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    noise_pred = unet(
        sample, torch.tensor([10, 500]), context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    return {"unet": noise_pred, "te1": h1, "te2": out2.hidden_states[-2], "pooled": out2.text_embeds}


@torch.no_grad()
def _reference(models, networks_and_ratios) -> dict[str, torch.Tensor]:
    """Outputs of the base model with the LoRAs applied (forward hooks) at the given multipliers."""
    for network, ratio in networks_and_ratios:
        network.set_multiplier(ratio)
        network.apply_to([models.text_encoder1, models.text_encoder2], models.unet)
    try:
        return _outputs(models)
    finally:
        for network, _ in networks_and_ratios:
            network.remove_from_model()


def _relative_errors(got, want) -> dict[str, float]:
    return {k: float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want}


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _merge(tiny_sdxl, out, picks) -> Path:
    files = [str(path) for (_, path), _ in picks]
    ratios = [str(r) for _, r in picks]
    assert (
        merge_main(
            ["--sd_model", str(tiny_sdxl.single_file), "--models", *files, "--ratios", *ratios, "--save_to", str(out)]
        )
        == 0
    )
    return out


def _assert_merged_equals_applied(models, tiny_sdxl, merged_file, picks) -> dict[str, float]:
    merged = load_sdxl(merged_file, config_dir=tiny_sdxl.diffusers_dir)
    want = _reference(models, [(net, r) for (net, _), r in picks])
    errors = _relative_errors(_outputs(merged), want)
    assert max(errors.values()) < RTOL, errors
    # The LoRAs move every output far beyond the tolerance, so the comparison is not vacuous.
    lora_effect = _relative_errors(_outputs(models), want)
    assert min(lora_effect.values()) > 1e-3, lora_effect
    return errors


@pytest.fixture(scope="module")
def merged_a(tiny_sdxl, lora_files, tmp_path_factory):
    """LoRA A (with conv LoRA) merged at strength 1."""
    return _merge(tiny_sdxl, tmp_path_factory.mktemp("merged") / "merged_a.safetensors", [(lora_files["a"], 1.0)])


@pytest.mark.slow
def test_merge_one_lora_with_conv_matches_applied_lora(models, tiny_sdxl, lora_files, merged_a):
    errors = _assert_merged_equals_applied(models, tiny_sdxl, merged_a, [(lora_files["a"], 1.0)])
    print("relative errors, one LoRA:", errors)
    with safe_open(str(merged_a), "pt") as f:
        metadata = f.metadata()
    record = json.loads(metadata["merge_lora"])
    assert record["base"] == tiny_sdxl.single_file.name
    assert [(lo["file"], lo["ratio"]) for lo in record["loras"]] == [("a.safetensors", 1.0)]
    assert metadata["modelspec.merged_from"] == "tiny_sdxl, lora a"


def test_only_lora_targets_change_and_the_rest_is_byte_identical(models, tiny_sdxl, lora_files, merged_a):
    network, lora_path = lora_files["a"]
    base_header, _, _ = read_safetensors_header(tiny_sdxl.single_file)
    merged_header, _, _ = read_safetensors_header(merged_a)
    assert base_header.keys() == merged_header.keys()
    table = lora_target_table({k: e.shape for k, e in base_header.items()})
    with safe_open(str(lora_path), "pt") as f:
        targets = {table[k.split(".")[0]].key for k in f.keys()}
    # One tensor per module, except TE2's q/k/v which share one fused in_proj_weight per layer.
    te2_layers = models.text_encoder2.config.num_hidden_layers
    assert len(targets) == len(network.unet_loras) + len(network.text_encoder_loras) - 2 * te2_layers
    assert any(k.endswith("in_layers.2.weight") for k in targets)  # 3x3 conv LoRAs
    assert any(k.endswith("skip_connection.weight") for k in targets)  # 1x1 conv
    assert any(k.endswith("in_proj_weight") for k in targets)  # TE2 fused q/k/v
    with safe_open(str(tiny_sdxl.single_file), "pt") as fb, safe_open(str(merged_a), "pt") as fm:
        for key in fb.keys():
            before, after = fb.get_tensor(key), fm.get_tensor(key)
            assert before.dtype == after.dtype
            same = before.reshape(-1).view(torch.uint8).equal(after.reshape(-1).view(torch.uint8))
            assert same == (key not in targets), key


@pytest.mark.slow
def test_merge_two_loras_at_different_strengths(models, tiny_sdxl, lora_files, tmp_path):
    picks = [(lora_files["a"], 1.0), (lora_files["b"], 0.5)]
    out = _merge(tiny_sdxl, tmp_path / "merged.safetensors", picks)
    print("relative errors, two LoRAs:", _assert_merged_equals_applied(models, tiny_sdxl, out, picks))


def test_save_precision_casts_every_float_tensor(tiny_sdxl, lora_files, tmp_path):
    out = tmp_path / "merged_fp16.safetensors"
    assert (
        merge_main(
            [
                "--sd_model",
                str(tiny_sdxl.single_file),
                "--models",
                str(lora_files["b"][1]),
                "--save_to",
                str(out),
                "--save_precision",
                "fp16",
            ]
        )
        == 0
    )
    base, merged = _tensors(tiny_sdxl.single_file), _tensors(out)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    key = "model.diffusion_model.middle_block.1.proj_in.bias"  # untouched: only cast
    assert torch.equal(merged[key], base[key].half())


def test_te2_qkv_update_their_third_of_in_proj():
    width = 4
    table = lora_target_table({"conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight": (12, 4)})
    rows = {p: table[f"lora_te2_text_model_encoder_layers_3_self_attn_{p}_proj"].rows for p in "qkv"}
    assert rows == {"q": (0, width), "k": (width, 2 * width), "v": (2 * width, 3 * width)}
    assert table["lora_te2_encoder_layers_3_self_attn_k_proj"].rows == (width, 2 * width)  # older spelling


def test_names_map_to_single_file_keys():
    table = lora_target_table(
        {
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": (8, 8),
            "model.diffusion_model.output_blocks.2.2.conv.weight": (8, 8, 3, 3),
            "model.diffusion_model.input_blocks.4.1.norm.weight": (8,),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight": (8, 32),
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (32, 8),
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight": (8, 8),
        }
    )
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"].key.endswith("to_out.0.weight")
    assert table["lora_unet_output_blocks_2_2_conv"].key.endswith("output_blocks.2.2.conv.weight")
    assert "lora_unet_input_blocks_4_1_norm" not in table  # 1-D: no LoRA target
    assert table["lora_te1_text_model_encoder_layers_0_mlp_fc2"].key.endswith("layers.0.mlp.fc2.weight")
    assert table["lora_te1_encoder_layers_0_mlp_fc2"] == table["lora_te1_text_model_encoder_layers_0_mlp_fc2"]
    assert table["lora_te2_text_model_encoder_layers_0_mlp_fc1"].key.endswith("resblocks.0.mlp.c_fc.weight")
    assert table["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"].key.endswith("attn.out_proj.weight")


def test_conv_delta_equals_the_composed_layers():
    g = torch.Generator().manual_seed(0)
    down = torch.randn(3, 5, 3, 3, generator=g, dtype=torch.float64)
    up = torch.randn(7, 3, 1, 1, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 9, generator=g, dtype=torch.float64)
    composed = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up) * (1.5 / 3)
    delta = lora_weight_delta(down, up, alpha=1.5)
    assert torch.allclose(torch.nn.functional.conv2d(x, delta, padding=1), composed, atol=1e-10)
    one_by_one = down[:, :, :1, :1]
    assert torch.equal(lora_weight_delta(one_by_one, up, 0.0), lora_weight_delta(one_by_one, up, 3))  # 0 = rank


def test_unknown_module_is_refused_in_one_line(tiny_sdxl, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 64),
            "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(64, 2),
            "lora_unet_input_blocks_99_1_proj_in.alpha": torch.tensor(1.0),
            "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(2, 128),
            "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.zeros(128, 2),
        },
        str(bogus),
    )
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/merge_lora.py",
            "--sd_model",
            str(tiny_sdxl.single_file),
            "--models",
            str(bogus),
            "--ratios",
            "1",
            "--save_to",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "lora_unet_input_blocks_99_1_proj_in" in lines[0] and "match no weight" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [bogus]  # nothing written, no temporary left


def test_ratio_count_and_missing_files_are_one_line_errors(tiny_sdxl, lora_files, tmp_path, capsys):
    a = str(lora_files["a"][1])
    out = str(tmp_path / "o.safetensors")
    assert (
        merge_main(["--sd_model", str(tiny_sdxl.single_file), "--models", a, "--ratios", "1", "0.5", "--save_to", out])
        == 2
    )
    assert merge_main(["--sd_model", str(tmp_path / "missing.safetensors"), "--models", a, "--save_to", out]) == 2
    assert merge_main(["--sd_model", str(tiny_sdxl.single_file), "--models", a, "--save_to", a]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "--ratios" in err[0] and "--sd_model" in err[1] and "--save_to" in err[2]


def test_fp16_base_stays_fp16(tiny_sdxl, lora_files, tmp_path):
    base = {k: v.half() for k, v in _tensors(tiny_sdxl.single_file).items()}
    base_file = tmp_path / "tiny_fp16.safetensors"
    save_file(base, str(base_file))
    out = tmp_path / "merged.safetensors"
    network, lora_path = lora_files["b"]
    assert (
        merge_main(["--sd_model", str(base_file), "--models", str(lora_path), "--ratios", "0.5", "--save_to", str(out)])
        == 0
    )
    merged = _tensors(out)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    module = network.unet_loras[0]
    key = lora_target_table({k: v.shape for k, v in base.items()})[module.lora_name].key
    down, up = module.lora_down.weight.detach(), module.lora_up.weight.detach()
    want = (base[key].float() + 0.5 * lora_weight_delta(down, up, float(module.alpha))).half()
    torch.testing.assert_close(merged[key], want, rtol=1e-3, atol=1e-5)  # fp16 rounding of the fp32 sum
    assert not torch.equal(merged[key], base[key])


def test_lora_for_another_model_is_refused_in_one_line(tiny_sdxl, tmp_path, capsys):
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {  # the right name, but a rank-2 LoRA for a 320-wide layer (full-size SDXL) on the tiny 128-wide one
            "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(2, 320),
            "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.zeros(320, 2),
        },
        str(wrong),
    )
    out = tmp_path / "out.safetensors"
    assert merge_main(["--sd_model", str(tiny_sdxl.single_file), "--models", str(wrong), "--save_to", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.diffusion_model.middle_block.1.proj_in.weight: ")
    assert "another model" in err[0] and not out.exists()


def test_a_merge_that_overflows_the_save_dtype_is_refused_and_writes_nothing(tiny_sdxl, lora_files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"an earlier merge")
    assert (
        merge_main(
            [
                "--sd_model",
                str(tiny_sdxl.single_file),
                "--models",
                str(lora_files["b"][1]),
                "--ratios",
                "1e9",
                "--save_to",
                str(out),
                "--save_precision",
                "fp16",
            ]
        )
        == 3
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: refusing to write {out}: ")
        and "weight holds NaN or infinite values after merging (as F16); lower the ratios or use --save_precision float"
        in err
    )
    assert len(err.splitlines()) == 1
    assert out.read_bytes() == b"an earlier merge" and [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]
