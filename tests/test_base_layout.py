"""Issue 18 item 2, the base's layout: the coarse layout loss (``pretrain.layout_loss_weight``) and cross-attention
levels as a config field (``unet.cross_attention_levels``), and that neither renames an unchanged base's cache folder.

.venv/bin/pytest tests/test_base_layout.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from omnidiff.base.config import BaseConfig
from omnidiff.base.pretrain import base_hash, build_models, compute_loss, draw_timesteps, layout_loss, model_record
from omnidiff.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DIGEST = "0" * 64  # any world digest: these tests compare records of the same world


def _cosine(prediction_type: str = "v_prediction") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


def _v_for(images: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """The v whose predicted image (sqrt(ab) x_t - sqrt(1 - ab) v) is exactly ``images``."""
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (ab.sqrt() * noisy - images) / (1 - ab).sqrt()


def test_layout_loss_reads_cell_means_only():
    scheduler = _cosine()
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([999, 900, 500, 50])
    noisy = scheduler.add_noise(images, torch.randn_like(images), t)
    exact = _v_for(images, noisy, t, scheduler)
    torch.testing.assert_close(layout_loss(images, noisy, exact, t, scheduler, 4), torch.zeros(4), atol=1e-8, rtol=0)
    # Detail inside the cells (a +-0.5 checkerboard: every 4x4 cell's mean is 0) costs nothing...
    checker = 0.5 * ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2 - 1).float()  # (16, 16)
    detail = _v_for(images + checker, noisy, t, scheduler)
    torch.testing.assert_close(layout_loss(images, noisy, detail, t, scheduler, 4), torch.zeros(4), atol=1e-6, rtol=0)
    # ...colour in the wrong cell costs its cell mean squared, averaged over cells and channels, at every t.
    moved = images.clone()
    moved[:, 0, :4, :4] += 1.0  # +1 in one of the 16 cells of one of 3 channels
    wrong = _v_for(moved, noisy, t, scheduler)
    torch.testing.assert_close(layout_loss(images, noisy, wrong, t, scheduler, 4), torch.full((4,), 1 / 48),
                               atol=1e-5, rtol=0)
    # Cells of 8 pixels: the same +1 on a quarter of one cell is a mean of 1/4 in one of 4 cells of 3 channels.
    torch.testing.assert_close(layout_loss(images, noisy, wrong, t, scheduler, 8), torch.full((4,), (1 / 16) / 12),
                               atol=1e-5, rtol=0)


class _Echo(torch.nn.Module):
    """A UNet stand-in that predicts a fixed v (only the loss arithmetic is under test here)."""

    config = type("C", (), {"class_embed_type": None, "addition_embed_type": None, "in_channels": 3,
                            "out_channels": 3})()

    def forward(self, sample, *args, **kwargs):
        return type("O", (), {"sample": torch.full_like(sample, 0.3)})()


def _text_encoder(ids, mask):
    return torch.zeros(len(ids), 77, 8), torch.zeros(len(ids), 8)


def test_compute_loss_adds_the_weighted_layout_term_and_refuses_noise_prediction():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    ids, mask = torch.zeros(8, 77, dtype=torch.long), torch.ones(8, 77, dtype=torch.bool)

    def loss(weight: float, scheduler=None) -> float:
        return compute_loss(images, ids, mask, _text_encoder, _Echo(), scheduler or _cosine(),
                            torch.Generator().manual_seed(1), 5.0, 0.0, weight, 4).item()

    # The same draws (noise, t) for every call: the difference is the layout term alone.
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    scheduler = _cosine()
    noisy = scheduler.add_noise(images, noise, t)
    expected = layout_loss(images, noisy, torch.full_like(images, 0.3), t, scheduler, 4).mean().item()
    assert expected > 0
    assert loss(2.0) - loss(0.0) == pytest.approx(2 * expected, rel=1e-4)
    with pytest.raises(ValueError, match="v_prediction"):
        loss(1.0, _cosine("epsilon"))


def test_config_checks_the_layout_loss_and_cross_attention_levels():
    base = REPO / "configs" / "base.yaml"
    with pytest.raises(ConfigError, match=r"layout_loss_weight=1\.0.*v_prediction"):
        load_config(BaseConfig, base, ["pretrain.layout_loss_weight=1", "pretrain.prediction_type=epsilon"])
    with pytest.raises(ConfigError, match=r"layout_cell=3.*resolution=16"):
        load_config(BaseConfig, base, ["pretrain.layout_loss_weight=1", "pretrain.layout_cell=3"])
    with pytest.raises(ConfigError, match=r"cross_attention_levels=4.*len\(block_out_channels\)=3"):
        load_config(BaseConfig, base, ["unet.cross_attention_levels=4"])
    cfg = load_config(BaseConfig, base, ["pretrain.layout_loss_weight=0.5", "pretrain.layout_cell=8"])
    assert (cfg.pretrain.layout_loss_weight, cfg.pretrain.layout_cell) == (0.5, 8)


def test_high_noise_draws_take_the_first_share_of_the_batch_from_the_noisiest_steps():
    plain = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw_timesteps(64, 1000, torch.Generator().manual_seed(3)), plain)  # fraction 0: as before
    t = draw_timesteps(64, 1000, torch.Generator().manual_seed(3), 0.25, 900)
    assert torch.all(t[:16] >= 900) and torch.all(t[:16] < 1000) and len(set(t[:16].tolist())) > 8
    torch.testing.assert_close(t[16:], plain[16:])  # the rest keep their uniform draws
    assert torch.all(draw_timesteps(10, 1000, torch.Generator().manual_seed(0), 1.0, 990) >= 990)
    with pytest.raises(ConfigError, match=r"high_noise_from=1000.*num_train_timesteps=1000"):
        load_config(BaseConfig, REPO / "configs" / "base.yaml", ["pretrain.high_noise_fraction=0.2",
                                                                 "pretrain.high_noise_from=1000"])


@pytest.mark.parametrize(("levels", "expected"), [(None, [False, True]), (2, [True, True]), (0, [False, False])])
def test_build_models_puts_cross_attention_in_the_levels_asked(levels, expected):
    sets = [] if levels is None else [f"unet.cross_attention_levels={levels}"]
    cfg = load_config(BaseConfig, REPO / "configs" / "base_test.yaml", sets)
    _, unet, _ = build_models(cfg)
    assert [b.startswith("CrossAttn") for b in unet.config.down_block_types] == expected
    assert [b.startswith("CrossAttn") for b in unet.config.up_block_types] == expected[::-1]
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"  # the mid block always reads the text


def test_the_new_keys_leave_an_unchanged_config_its_cache_name():
    """Bases cached (and shipped) before these keys existed keep their folder names: at their neutral values the
    keys are not part of the record; any other value is, and renames the folder."""
    base = REPO / "configs" / "base_test.yaml"  # sets none of the new keys (2 UNet levels)
    plain = load_config(BaseConfig, base)
    record = model_record(plain, DIGEST)["config"]
    assert "cross_attention_levels" not in record["unet"]
    assert "layout_loss_weight" not in record["pretrain"] and "layout_cell" not in record["pretrain"]
    assert "high_noise_fraction" not in record["pretrain"] and "high_noise_from" not in record["pretrain"]
    assert "coord_channels" in record["unet"] and "min_snr_floor" in record["pretrain"]  # older keys stay
    name = base_hash(plain, DIGEST)
    # layout_cell means nothing while the layout loss is off; 1 of 2 levels is what None builds
    for same in ("pretrain.layout_cell=8", "unet.cross_attention_levels=1", "pretrain.high_noise_from=500",
                 "pretrain.high_noise_weight=2", "pretrain.high_noise_text_grad=false"):
        assert base_hash(load_config(BaseConfig, base, [same]), DIGEST) == name, same
    changed = {
        base_hash(load_config(BaseConfig, base, [s]), DIGEST)
        for s in ("unet.cross_attention_levels=2", "unet.cross_attention_levels=0", "pretrain.layout_loss_weight=1",
                  "pretrain.high_noise_fraction=0.2")
    }
    assert name not in changed and len(changed) == 4
    on = load_config(BaseConfig, base, ["pretrain.layout_loss_weight=1"])
    assert base_hash(load_config(BaseConfig, base, ["pretrain.layout_loss_weight=1", "pretrain.layout_cell=8"]),
                     DIGEST) != base_hash(on, DIGEST)


class _ReadsText(torch.nn.Module):
    """A UNet stand-in whose prediction is 0.3 plus the mean of its text states (so the text gets gradients)."""

    config = _Echo.config

    def forward(self, sample, timesteps, encoder_hidden_states=None, **kwargs):
        text = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]  # (B, 1, 1, 1)
        return type("O", (), {"sample": 0.3 + text * torch.ones_like(sample)})()


def test_the_high_noise_share_gets_its_image_space_weight_and_can_leave_the_text_encoder_alone():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    ids, mask = torch.zeros(8, 77, dtype=torch.long), torch.ones(8, 77, dtype=torch.bool)
    scheduler = _cosine()
    # compute_loss draws the noise, then the timesteps: the same draws here
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=gen)
    t = draw_timesteps(8, 1000, gen, 0.5, 900)
    per = ((0.3 - scheduler.get_velocity(images, noise, t)) ** 2).mean(dim=(1, 2, 3))  # (8,)
    from omnidiff.pipeline import min_snr_weights

    plain = min_snr_weights(scheduler, t, 5.0)
    assert torch.all(plain[:4] < 0.03)  # ~SNR at t >= 900
    weights = torch.cat([2.0 * (1 - scheduler.alphas_cumprod[t[:4]]), plain[4:]])
    got = compute_loss(images, ids, mask, _text_encoder, _Echo(), scheduler, torch.Generator().manual_seed(1), 5.0,
                       0.0, 0.0, 4, 0.5, 900, 2.0)
    assert got.item() == pytest.approx((per * weights).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="v_prediction"):
        compute_loss(images, ids, mask, _text_encoder, _Echo(), _cosine("epsilon"), torch.Generator().manual_seed(1),
                     5.0, 0.0, 0.0, 4, 0.5, 900, 2.0)

    def text_grads(text_grad: bool) -> torch.Tensor:
        rows = torch.ones(8, 8, requires_grad=True)  # one text state per image

        def encoder(ids, mask):
            return rows[:, None, :].expand(-1, 77, -1), rows

        compute_loss(images, ids, mask, encoder, _ReadsText(), scheduler, torch.Generator().manual_seed(1), 5.0, 0.0,
                     0.0, 4, 0.5, 900, 2.0, text_grad).backward()
        return rows.grad.abs().sum(dim=1)  # (8,)

    assert torch.all(text_grads(True) > 0)
    kept_out = text_grads(False)
    assert torch.all(kept_out[:4] == 0) and torch.all(kept_out[4:] > 0), kept_out


def test_the_high_noise_share_starts_at_high_noise_after(monkeypatch):
    import omnidiff.base.pretrain as pretrain

    cfg = load_config(BaseConfig, REPO / "configs" / "base_test.yaml",
                      ["pretrain.steps=6", "pretrain.high_noise_fraction=0.5", "pretrain.high_noise_after=4"])
    seen = []
    real = pretrain.compute_loss

    def recording(*args):
        seen.append(args[11])  # high_noise_fraction
        return real(*args)

    monkeypatch.setattr(pretrain, "compute_loss", recording)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    pretrain.train(cfg, images, ["a red circle in the centre"] * 8)
    assert seen == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"high_noise_after=6.*steps=6"):
        load_config(BaseConfig, REPO / "configs" / "base_test.yaml",
                    ["pretrain.steps=6", "pretrain.high_noise_fraction=0.5", "pretrain.high_noise_after=6"])


def test_the_layout_phase_runs_after_the_main_steps_with_its_own_optimiser(monkeypatch):
    """``high_noise_steps``: the first ``steps`` draw no high-noise share (they train as without the phase), then
    that many more steps draw it, at the constant ``high_noise_lr`` after a short warm-up."""
    import omnidiff.base.pretrain as pretrain

    cfg = load_config(BaseConfig, REPO / "configs" / "base_test.yaml",
                      ["pretrain.steps=5", "pretrain.high_noise_fraction=0.5", "pretrain.high_noise_steps=3",
                       "pretrain.high_noise_lr=0.0007", "pretrain.high_noise_after=1"])  # after: ignored in a phase
    seen, lrs = [], []
    real_loss, real_step = pretrain.compute_loss, torch.optim.AdamW.step

    def recording(*args):
        seen.append(args[11])
        return real_loss(*args)

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(pretrain, "compute_loss", recording)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = pretrain.train(cfg, torch.rand(8, 3, 16, 16) * 2 - 1, ["a red circle in the centre"] * 8)
    assert seen == [0.0] * 5 + [0.5] * 3 and len(result["losses"]) == 8
    assert lrs[5:] == pytest.approx([0.0007 * k / pretrain.LAYOUT_WARMUP for k in (1, 2, 3)])
    assert max(lrs[:5]) <= cfg.pretrain.lr and lrs[4] != pytest.approx(0.0007 / pretrain.LAYOUT_WARMUP)
    with pytest.raises(ConfigError, match=r"high_noise_steps=3.*high_noise_fraction"):
        load_config(BaseConfig, REPO / "configs" / "base_test.yaml", ["pretrain.high_noise_steps=3"])
