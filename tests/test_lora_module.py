"""The LoRA module's dropouts, on Linear (B, T, C) and Conv2d (B, C, H, W) inputs."""

import torch
from torch import nn

from networks.lora_module import LoRAModule


def _module(base, **kwargs):
    torch.manual_seed(0)
    lora = LoRAModule("m", base, lora_dim=8, alpha=8, **kwargs)
    nn.init.normal_(lora.lora_up.weight)
    return lora


def test_rank_dropout_masks_whole_ranks_per_sample_and_rescales():
    for base, x in ((nn.Linear(6, 5), torch.randn(3, 4, 6)), (nn.Conv2d(6, 5, 3, padding=1), torch.randn(3, 6, 4, 4))):
        lora = _module(base, rank_dropout=0.5)
        lora.eval()
        assert torch.equal(lora.lora_delta(x), lora.lora_delta(x))  # no dropout outside training
        lora.train()
        torch.manual_seed(1)
        out = lora.lora_delta(x)
        torch.manual_seed(1)
        keep = (torch.rand(3, 8) > 0.5).float()
        h = lora.lora_down(x)
        h = h * (keep.view(3, 8, 1, 1) if h.dim() == 4 else keep.view(3, 1, 8))
        assert torch.allclose(out, lora.lora_up(h) * 2.0, atol=1e-6)  # scale alpha/dim = 1, / (1 - 0.5)


def test_module_dropout_skips_the_path():
    lora = _module(nn.Linear(6, 5), module_dropout=0.999)
    lora.train()
    assert float(lora.lora_delta(torch.randn(2, 6)).abs().sum()) == 0.0
    lora.eval()
    assert float(lora.lora_delta(torch.randn(2, 6)).abs().sum()) > 0.0
