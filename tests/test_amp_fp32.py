"""Under bf16 autocast the predicted age stays fp32: the head, the prior and
``age_mean + age_std * z`` run outside autocast. Checked with CPU autocast (no GPU needed): a
bf16 age would sit on bf16's grid (steps of 0.25 y between 32 and 64, 0.5 y above)."""

from __future__ import annotations

import pytest
import torch

from rankcore.models import AgeRegressor, BackboneConfig, CorrectionRegressor

SHAPE = (16, 20, 18)


def _randomise_head(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = model.head[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.5)
        last.bias.copy_(torch.randn(last.bias.shape, generator=gen) * 0.5)
        for name in ("prior_weight", "prior_bias"):
            buf = getattr(model, name, None)
            if buf is not None and buf.numel():
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)


def _on_bf16_grid(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float() == x


@pytest.mark.parametrize("stage", [1, 2])
def test_predicted_age_is_fp32_under_bf16_autocast(stage):
    torch.manual_seed(0)
    config = BackboneConfig(growth=(4, 8))
    model = AgeRegressor(config) if stage == 1 else CorrectionRegressor(config)
    model.set_age_scale(55.3, 13.7)
    _randomise_head(model, stage)
    model.eval()
    image = torch.randn(16, 1, *SHAPE)
    sex = torch.tensor([1.0, -1.0] * 8)
    args = (image, sex) if stage == 1 else (image, torch.linspace(35.0, 85.0, 16), sex)
    with torch.no_grad():
        fp32 = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(*args)
    assert amp.dtype == torch.float32
    assert fp32.std() > 1.0  # the ages spread over years, across bf16's coarse steps
    # fp32 ages land on bf16's grid by chance about once in 2**16; bf16 ages always do
    assert int(_on_bf16_grid(amp).sum()) <= 1, amp
    # the convolutions ran in bf16, so the ages differ a little, but far less than a step
    assert float((amp - fp32).abs().max()) < 0.25
