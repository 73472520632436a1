"""tools/lora_info.py: modules per component and block, ranks, alphas, LoRA+ and the parameter groups."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from networks import lora
from tools.lora_info import describe_lora, format_lora_info, main

REPO_ROOT = Path(__file__).resolve().parents[1]
NETWORK_ARGS = {"conv_dim": "2", "conv_alpha": "1", "loraplus_lr_ratio": "16"}


@pytest.fixture(scope="module")
def saved_lora(tiny_models, tmp_path_factory):
    """A tiny LoRA (dim 4, alpha 1, conv 3x3 dim 2 alpha 1, LoRA+ 16) with the metadata the trainer writes."""
    m = tiny_models  # create_network only reads the model (nothing is applied)
    network = lora.create_network(1.0, 4, 1.0, m.vae, [m.text_encoder1, m.text_encoder2], m.unet, **NETWORK_ARGS)
    groups = network.param_group_infos(None, None, 1e-4)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "1.0",
        "ss_network_args": json.dumps(NETWORK_ARGS),
        "ss_sd_model_name": "tiny_sdxl.safetensors",
        "ss_sd_model_hash": "0f8ab396",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_steps": "24",
        "ss_epoch": "12",
        "ss_resolution": "(1024, 1024)",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_learning_rate": "0.0001",
        "ss_lr_scheduler": "cosine_with_restarts",
        "ss_lr_param_groups": json.dumps([asdict(g) for g in groups]),
    }
    path = tmp_path_factory.mktemp("info") / "tiny_lora.safetensors"
    network.save_weights(path, torch.float16, metadata)
    return path, network, groups


def test_modules_per_component_dims_and_alphas(saved_lora, tiny_models):
    path, network, _ = saved_lora
    info = describe_lora(path)
    te1_layers = tiny_models.text_encoder1.config.num_hidden_layers
    te2_layers = tiny_models.text_encoder2.config.num_hidden_layers
    comps = info["components"]
    assert list(comps) == ["te1", "te2", "unet"]
    assert comps["te1"]["modules"] == 6 * te1_layers and comps["te2"]["modules"] == 6 * te2_layers
    assert comps["unet"]["modules"] == len(network.unet_loras)
    assert info["modules"] == len(network.unet_loras) + len(network.text_encoder_loras)
    assert comps["te1"]["dims"] == [4] and comps["te1"]["alphas"] == [1.0] and comps["te1"]["conv_modules"] == 0
    assert comps["unet"]["dims"] == [2, 4]  # Linear / 1x1 layers take dim 4, 3x3 convs conv_dim 2
    conv3x3 = sum(
        1 for m in network.unet_loras if m.lora_down.weight.dim() == 4 and tuple(m.lora_down.weight.shape[2:]) != (1, 1)
    )
    assert info["conv"] == {"modules": conv3x3, "dims": [2], "alphas": [1.0]} and conv3x3 > 0
    assert info["dtypes"] == ["float16"] and info["tensors"] == 3 * info["modules"]
    # UNet blocks in order, summing to the UNet's modules; SDXL's level 0 has ResNets only (conv LoRA).
    blocks = info["unet_blocks"]
    assert sum(blocks.values()) == comps["unet"]["modules"]
    assert list(blocks)[:2] == ["input_blocks 1", "input_blocks 2"] and "middle_block" in blocks
    assert list(blocks).index("middle_block") < list(blocks).index("output_blocks 0")
    assert list(blocks)[-1] == "output_blocks 8"


def test_loraplus_and_param_groups_are_shown(saved_lora):
    path, _, groups = saved_lora
    info = describe_lora(path)
    assert info["loraplus"] == {"enabled": True, "unet_ratio": 16.0, "text_encoder_ratio": 16.0}
    assert [g["description"] for g in info["param_groups"]] == [g.description for g in groups]
    assert info["metadata"]["ss_network_args"] == json.dumps(NETWORK_ARGS)

    text = format_lora_info(info)
    assert "LoRA+: on (unet lr x16, text encoder lr x16)" in text
    assert "modules: " + str(info["modules"]) + " (te1 72, te2 60, unet " in text
    assert "conv LoRA (3x3): " + str(info["conv"]["modules"]) + " modules, dim 2, alpha 1" in text
    assert "base model     tiny_sdxl.safetensors  hash 0f8ab396  sdxl_base_v1-0" in text
    rows = [line.split() for line in text.splitlines()[text.splitlines().index("parameter groups:") + 2 :]]
    assert rows == [
        [g.component, *(["plus", "(B)"] if g.plus else ["base"]), str(g.tensors), f"{g.parameters:,}", f"{g.lr:.3g}"]
        for g in groups
    ]
    assert [r[-1] for r in rows] == ["0.0001", "0.0016", "0.0001", "0.0016"]


def test_json_output_parses(saved_lora, capsys):
    path, _, _ = saved_lora
    assert main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(describe_lora(path)))


def test_sd_scripts_metadata_without_param_groups(tmp_path):
    """A UNet-only sd-scripts file: LoRA+ read from ss_network_args (the specific ratio wins)."""
    path = tmp_path / "sd_scripts.safetensors"
    save_file(
        {
            "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(8, 16),
            "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.zeros(16, 8),
            "lora_unet_middle_block_1_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_args": '{"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "8"}',
        },
    )
    info = describe_lora(path)
    assert info["loraplus"] == {"enabled": True, "unet_ratio": 8.0, "text_encoder_ratio": 16.0}
    assert info["param_groups"] is None and info["unet_blocks"] == {"middle_block": 1}
    assert "LoRA+: on (unet lr x8, text encoder lr x16)" in format_lora_info(info)


def test_file_without_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 2),
            "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight": torch.zeros(3, 32, 3, 3),
            "lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight": torch.zeros(64, 3, 1, 1),
            "lora_unet_input_blocks_4_0_in_layers_2.alpha": torch.tensor(0.0),  # 0 means alpha = rank
        },
        str(path),
    )
    info = describe_lora(path)
    assert not info["has_metadata"] and info["param_groups"] is None
    assert info["loraplus"]["enabled"] is None
    assert info["components"]["te1"] == {"modules": 1, "dims": [2], "alphas": [2.0], "conv_modules": 0}
    assert info["conv"] == {"modules": 1, "dims": [3], "alphas": [3.0]}
    text = format_lora_info(info)
    assert "metadata: none" in text and "LoRA+: unknown" in text


def test_runs_from_the_repo_root(saved_lora):
    path, _, _ = saved_lora
    proc = subprocess.run(
        [sys.executable, "tools/lora_info.py", str(path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "LoRA+: on" in proc.stdout
    missing = subprocess.run(
        [sys.executable, "tools/lora_info.py", "missing.safetensors"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr.strip() == "error: no such file: missing.safetensors"
