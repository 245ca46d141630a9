"""What lets the tiny base draw position (issue 18 item 2): the noisiest steps keep their loss weight.

.venv/bin/pytest tests/test_base_position.py -x -q

Where the shape goes is decided at the noisiest sampling steps. Plain Min-SNR weights a v-prediction
step by min(SNR, gamma) / (SNR + 1), ~SNR there, so the base never learned to read the corner words
from those steps (benchmarks/base_position.py: the same noise drew the same corner for all four corner
wordings). ``pretrain.min_snr_floor`` clamps SNR from below too. The coordinate channels are in
tests/test_unet_coords.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from omnidiff.pipeline import min_snr_weights

REPO = Path(__file__).resolve().parents[1]


def _cosine(prediction_type: str = "v_prediction") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


def test_the_floor_keeps_the_noisiest_steps_weighted_and_leaves_the_rest():
    scheduler = _cosine()
    t = torch.tensor([999, 950, 900, 500, 100, 10])
    plain = min_snr_weights(scheduler, t, gamma=5.0)
    floored = min_snr_weights(scheduler, t, gamma=5.0, floor=1.0)
    assert plain[0] < 0.01 and plain[1] < 0.05, plain  # what the old base trained its layout steps with
    assert floored[0] > 0.99 and floored[1] > 0.95, floored  # weight 1 / (SNR + 1) ~ 1 where SNR ~ 0
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    above = snr >= 1.0  # where SNR is over the floor, nothing changes
    assert above.any() and (~above).any()
    torch.testing.assert_close(floored[above], plain[above])
    assert torch.all(floored[~above] > plain[~above])
    torch.testing.assert_close(min_snr_weights(scheduler, t, gamma=5.0, floor=0.0), plain)
    assert torch.all(min_snr_weights(scheduler, t, gamma=0.0) == 1.0)  # gamma 0: no weighting at all
    with pytest.raises(ValueError, match="floor=6.0"):
        min_snr_weights(scheduler, t, gamma=5.0, floor=6.0)


def test_the_floor_set_on_the_shipped_base_trains_its_noisiest_steps():
    """The demo's base ships with the floor off (floor 1 measured worse at full size, issue 18): its noisiest steps get
    almost no weight; ``pretrain.min_snr_floor=1`` on the same config gives them about 1."""
    from omnidiff.base.config import BaseConfig
    from omnidiff.config import ConfigError, load_config

    shipped = load_config(BaseConfig, REPO / "configs" / "base.yaml")
    assert shipped.pretrain.prediction_type == "v_prediction" and shipped.pretrain.min_snr_floor == 0.0
    t = torch.tensor([990])
    off = min_snr_weights(_cosine(), t, shipped.pretrain.min_snr_gamma, shipped.pretrain.min_snr_floor)
    assert off.item() < 0.05
    cfg = load_config(BaseConfig, REPO / "configs" / "base.yaml", ["pretrain.min_snr_floor=1.0"])
    weight = min_snr_weights(_cosine(), t, cfg.pretrain.min_snr_gamma, cfg.pretrain.min_snr_floor)
    assert weight.item() > 0.9
    with pytest.raises(ConfigError, match=r"pretrain\.min_snr_floor=6\.0"):
        load_config(BaseConfig, REPO / "configs" / "base.yaml", ["pretrain.min_snr_floor=6.0"])


def test_pretraining_passes_the_floor_to_the_loss():
    from omnidiff.base.pretrain import compute_loss

    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1

    class Zero(torch.nn.Module):  # stand-ins with the call signatures compute_loss uses
        config = type("C", (), {"class_embed_type": None, "addition_embed_type": None, "in_channels": 3,
                                "out_channels": 3})()

        def forward(self, sample, *args, **kwargs):
            return type("O", (), {"sample": torch.zeros_like(sample)})()

    def text_encoder(ids, mask):
        return torch.zeros(len(ids), 77, 8), torch.zeros(len(ids), 8)

    ids, mask = torch.zeros(8, 77, dtype=torch.long), torch.ones(8, 77, dtype=torch.bool)
    losses = [compute_loss(images, ids, mask, text_encoder, Zero(), _cosine(), torch.Generator().manual_seed(1),
                           5.0, floor).item() for floor in (0.0, 1.0)]
    assert losses[1] > losses[0], losses  # same draws, the noisy steps now count


def test_the_sampler_starts_where_the_training_noise_is_pure():
    """The tiny base samples from pure noise, so its sampler's first timestep must be the training's noisiest
    (999 of 1000, alpha_bar ~2e-9). The training scheduler's default "leading" spacing started 20 steps at
    t=940, where training images keep alpha 0.09 of their signal: the model read the noise's low frequencies
    as that faint image, and the noise decided the corner (benchmarks/base_position.py)."""
    from omnidiff.pipeline import sampling_scheduler

    train = _cosine()
    assert train.config.timestep_spacing == "leading"  # what a pretrain's scheduler carries into the sampler
    sampler = sampling_scheduler(train.config, 20)
    sampler.set_timesteps(20)
    steps = sampler.timesteps.tolist()
    assert steps[0] == 999, steps
    assert train.alphas_cumprod[steps[0]] < 1e-6
    assert len(set(steps)) == 20 and steps == sorted(steps, reverse=True) and steps[-1] < 100, steps
    assert sampler.config.prediction_type == "v_prediction" and sampler.config.thresholding
