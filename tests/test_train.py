"""Training stage: configs, pure data/loss pieces, and the three stages on the tiny fixtures (one rank, in-process).

    .venv/bin/pytest tests/test_train.py -x -q

The multi-worker Ray Train runs, kill-and-resume and the MLflow registry are in tests/test_train_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omnidiff.config import ConfigError, load_config
from train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "configs" / "train_test_stage{}.yaml"
WEIGHTS = {"norm_weight": 0.1, "length_weight": 0.1}  # the stage-1 loss weights of the shipped configs


def _cfg(stage: int, overrides=()) -> TrainConfig:
    return load_config(TrainConfig, str(TEST_CONFIG).format(stage), list(overrides))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("stage", "override", "key"),
    [
        (1, "global_batch_size=12", "global_batch_size"),
        (1, "train_unet=all", "train_unet"),
        (2, "init_from=null", "init_from"),
        (3, "data.aesthetic_min=null", "data.aesthetic_min"),
        (1, "dist.num_workers=2", "dist.num_workers"),
        (1, "adapter.num_queries=100", "adapter.num_queries"),
        (2, "ema_decay=1.5", "ema_decay"),
        (2, "dist.zero_stage=5", "dist.zero_stage"),
    ],
)
def test_config_errors_name_the_key(stage, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(stage, [override])


def test_shipped_train_configs_load():
    for path in sorted((REPO / "configs").glob("train_*.yaml")):
        cfg = load_config(TrainConfig, path)
        assert cfg.stage in (1, 2, 3), path
        assert cfg.grad_accum_steps >= 1


# ----------------------------------------------------------------------------- pure pieces


def test_align_examples_use_the_english_side_and_parallel_text():
    from omnidiff.contracts.keys import text_key
    from train.data import align_examples

    pairs = pd.DataFrame({
        "caption": ["a red circle", "一个红色的圆", "ein roter kreis", "un cercle"],
        "lang": ["en", "zh", "de", "fr"],
        "caption_en": [None, "a red circle", "a red circle", None],  # fr has no English side: left out
        "split": ["train", "train", "val", "train"],
    })
    parallel = pd.DataFrame({"text": ["un cercle rouge"], "lang": ["fr"], "text_en": ["a red circle"],
                             "split": ["train"]})
    table = align_examples(pairs, parallel, "train")
    assert set(table["source"]) == {"pair", "parallel"}
    assert set(table["target_key"]) == {text_key("a red circle")}
    assert set(table["llm_key"]) == {text_key(t) for t in ("a red circle", "一个红色的圆", "un cercle rouge")}


def test_diffusion_examples_filter_by_aesthetic():
    from train.data import diffusion_examples

    pairs = pd.DataFrame({"caption": ["a", "b", "c"], "lang": ["en"] * 3, "image_digest": ["x", "y", "z"],
                          "split": ["train"] * 3, "aesthetic": [1.0, 4.0, 3.0]})
    assert list(diffusion_examples(pairs, "train", 2.5)["pixel_key"]) == ["y", "z"]
    assert len(diffusion_examples(pairs, "train")) == 3


def test_sample_prompts_cover_every_language_short_and_long():
    from omnidiff.contracts.keys import text_key
    from train.data import sample_prompt_table

    pairs = pd.DataFrame({"caption": ["a", "b " * 50, "c", "d"], "lang": ["en", "en", "zh", "zh"],
                          "split": ["val"] * 4})
    lengths = {text_key("a"): 3, text_key(("b " * 50).strip()): 120, text_key("c"): 2, text_key("d"): 4}
    table = sample_prompt_table(pairs, lengths, per_group=1)
    assert set(zip(table["lang"], table["group"], strict=True)) == {("en", "short"), ("en", "long"), ("zh", "short")}


def test_positions_do_not_depend_on_the_worker_count():
    from train.data import CachedBatches

    def step_positions(world: int, step: int, global_batch: int = 16, micro: int = 4) -> list[int]:
        accum = global_batch // (micro * world)
        return sorted(int(p) for r in range(world) for m in range(accum)
                      for p in CachedBatches.positions(step, global_batch, r, world, micro, m))

    for step in (0, 3):
        assert step_positions(1, step) == step_positions(2, step) == step_positions(4, step) == list(
            range(step * 16, step * 16 + 16))


def test_pad_states_and_clip_mask():
    from train.data import clip_target_mask, pad_states

    states, mask = pad_states([np.ones((2, 3), np.float16), np.ones((4, 3), np.float16)])
    assert states.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    states[1, 1] = 0  # a zero position inside the stored range is not a real CLIP token
    assert clip_target_mask(states, mask)[1].tolist() == [True, False, True, True]


def test_align_loss_ignores_target_padding_and_detects_misalignment():
    from train.losses import compute_align_loss

    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    pooled = torch.randn(2, 8)

    class Echo(torch.nn.Module):  # an "adapter" that outputs a fixed tensor, to probe the loss alone
        def __init__(self, tokens, pooled):
            super().__init__()
            self.tokens, self.pooled = tokens, pooled

        def forward_all(self, states, mask):
            return self.tokens, self.pooled, None

    batch = {"llm_states": torch.zeros(2, 1, 4), "llm_mask": torch.ones(2, 1, dtype=torch.bool), "target": target,
             "target_mask": mask, "target_pooled": pooled}
    perfect = torch.cat([target, torch.randn(2, 3, 8)], 1)  # 8 queries; the 3 past the target are free
    loss, metrics = compute_align_loss(batch, {"adapter": Echo(perfect, pooled)}, **WEIGHTS)
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and metrics["token_cos"] == pytest.approx(1.0, abs=1e-5)
    garbage_in_padding = perfect.clone()
    garbage_in_padding[1, 3:5] = 100.0  # positions the second caption does not have
    assert compute_align_loss(batch, {"adapter": Echo(garbage_in_padding, pooled)}, **WEIGHTS)[0].item() == pytest.approx(
        0.0, abs=1e-5)
    wrong = perfect.clone()
    wrong[0, 0] = -wrong[0, 0]
    assert compute_align_loss(batch, {"adapter": Echo(wrong, pooled)}, **WEIGHTS)[0].item() > 0.1


def test_align_loss_teaches_the_length_head_how_many_queries_are_real():
    """A few steps on two captions of different lengths: the length head predicts each one's number of
    real CLIP tokens, and condition() hands the UNet exactly that prefix of queries (set matching)."""
    from omnidiff.models.adapter import OmniAdapter
    from train.losses import compute_align_loss

    torch.manual_seed(0)
    adapter = OmniAdapter(16, 32, 8, 10, 1, 1, 4, input_norm=False, length_head=True, pooled_query=True)
    states = torch.randn(2, 6, 16)
    llm_mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    target = torch.randn(2, 7, 8)
    target_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    target[1, 3:] = 0
    batch = {"llm_states": states, "llm_mask": llm_mask, "target": target, "target_mask": target_mask,
             "target_pooled": torch.randn(2, 8)}
    _, first = compute_align_loss(batch, {"adapter": adapter}, norm_weight=0.1, length_weight=1.0)
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    for _ in range(200):
        loss, metrics = compute_align_loss(batch, {"adapter": adapter}, norm_weight=0.1, length_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["count_err"] == 0.0 and first["count_err"] > 0
    _, _, mask = adapter.eval().condition(states, llm_mask)
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[0, :7], expected[1, :3] = True, True
    assert torch.equal(mask, expected)


def test_set_matching_answers_each_real_token_with_one_of_the_first_n_queries():
    """The Hungarian matching finds the permutation: tokens that are the targets shuffled give loss 0;
    queries past n never answer a real token."""
    from train.losses import compute_align_loss, set_assignment

    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target[1, 3:] = 0
    perm = torch.tensor([[3, 0, 4, 1, 2], [2, 0, 1, 3, 4]])
    tokens = torch.cat([torch.stack([target[b, perm[b]] for b in range(2)]), torch.randn(2, 3, 8)], 1)  # (2, 8, 8)
    order = set_assignment(tokens, target, mask)
    for b in range(2):
        n = int(mask[b].sum())
        assert sorted(order[b, :n].tolist()) == list(range(n))
        torch.testing.assert_close(tokens[b, order[b, :n]], target[b, :n])

    class Echo(torch.nn.Module):
        def forward_all(self, states, llm_mask):
            return tokens, target[:, 0] * 0 + 1, None

    batch = {"llm_states": torch.zeros(2, 1, 4), "llm_mask": torch.ones(2, 1, dtype=torch.bool), "target": target,
             "target_mask": mask, "target_pooled": torch.ones(2, 8)}
    assert compute_align_loss(batch, {"adapter": Echo()}, **WEIGHTS)[0].item() == pytest.approx(0.0, abs=1e-5)


def test_set_matching_costs_only_the_queries_it_can_choose():
    """Only the first Tc queries can answer (n real targets -> queries 0..n-1, padding -> n..Tc-1), so the
    matching over those is the matching over all Q (here from the full (Tc, Q) cost matrix)."""
    from scipy.optimize import linear_sum_assignment

    from train.losses import set_assignment

    torch.manual_seed(1)
    tokens, target = torch.randn(4, 20, 8), torch.randn(4, 6, 8)  # Q = 20 queries, Tc = 6 target positions
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 1, 5])[:, None]
    order = set_assignment(tokens, target, mask)
    cost = 1 - torch.nn.functional.normalize(target, dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).mT
    for b in range(4):
        n = int(mask[b].sum())
        rows, cols = linear_sum_assignment(cost[b, :n, :n].numpy())
        assert order[b, rows].tolist() == cols.tolist()
        assert order[b, n:].tolist() == list(range(n, 6))


def test_lr_schedule_warms_up_then_decays():
    from train.engine import lr_factor

    assert [lr_factor(s, 4, 20, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)


def test_lr_schedule_decays_as_diffusers_does_after_its_warm_up():
    """diffusers' schedules decay the same after warm-up; their warm-up starts at 0 where ours starts at
    1/warmup (so train.engine keeps its own, see lr_factor)."""
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    from train.engine import lr_factor

    def factors(make, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        return [sched.lr_lambdas[0](s) for s in steps]

    after = [4, 5, 9, 12, 19, 20]
    assert factors(lambda o: get_cosine_schedule_with_warmup(o, 4, 20), after) == pytest.approx(
        [lr_factor(s, 4, 20, "cosine") for s in after], abs=1e-12)
    assert factors(lambda o: get_linear_schedule_with_warmup(o, 4, 20), after) == pytest.approx(
        [lr_factor(s, 4, 20, "linear") for s in after], abs=1e-12)
    assert factors(lambda o: get_constant_schedule_with_warmup(o, 4), after) == [1.0] * len(after)
    assert factors(lambda o: get_constant_schedule_with_warmup(o, 4), [0])[0] == 0.0 != lr_factor(0, 4, 20, "constant")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula_on_diffusers_compute_snr(prediction_type):
    """min(SNR, gamma) / SNR (noise) or / (SNR + 1) (v), SNR = alpha_bar / (1 - alpha_bar)."""
    from diffusers import DDPMScheduler

    from omnidiff.pipeline import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    t = torch.arange(0, 1000, 7)
    alpha_bar = scheduler.alphas_cumprod[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), expected, rtol=1e-6, atol=0)
    assert torch.equal(min_snr_weights(scheduler, t, 0.0), torch.ones(len(t)))


def test_ema_update_is_a_constant_decay_average():
    from train.engine import ema_init, ema_update

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    ema = ema_init(model, 0.9)
    assert set(ema) == {"weight"} and ema_init(model, 0.0) == {}
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema["weight"], 0.9 * start + 0.1 * (start + 1.0))


def test_one_training_per_checkpoint_folder(tmp_path):
    """Rank 0's lock: a second holder waits, then fails naming the folder; released, it is free again."""
    from train.checkpoint import hold_checkpoint_lock

    cfg = _cfg(1)
    lock = hold_checkpoint_lock(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="in use by another training run"):
        hold_checkpoint_lock(tmp_path, cfg, wait_s=0.2)
    lock.release()
    hold_checkpoint_lock(tmp_path, cfg, wait_s=0.2).release()


def test_ray_train_state_api_warning_is_dropped_and_nothing_else():
    import logging

    from omnidiff.ray_logging import CLEANER_LOGGER, quiet_ray_workers

    quiet_ray_workers()
    quiet_ray_workers()  # idempotent
    logger = logging.getLogger(CLEANER_LOGGER)
    assert len(logger.filters) == 1

    def record(msg):
        return logging.LogRecord(CLEANER_LOGGER, logging.WARNING, __file__, 1, msg, None, None)

    assert not logger.filter(record("Failed to query Ray Train Controller actor state. State API may be ..."))
    assert logger.filter(record("Detected that the Ray Train controller actor (x) is dead."))


def test_unet_part_selection():
    from train.model import unet_trainable

    cross = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    self_attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    conv = "down_blocks.0.resnets.0.conv1.weight"
    assert [unet_trainable(n, "cross_attention") for n in (cross, self_attn, conv)] == [True, False, False]
    assert [unet_trainable(n, "attention") for n in (cross, self_attn, conv)] == [True, True, False]
    assert unet_trainable("class_embedding.linear_1.weight", "cross_attention")
    assert not unet_trainable(conv, "none") and unet_trainable(conv, "all")


def test_a_layout_change_that_cannot_be_converted_fails_clearly(tmp_path):
    """A ZeRO-0 checkpoint keeps no per-rank optimizer shards, so it cannot become a ZeRO-2 one."""
    from train.checkpoint import META_NAME, prepare_resume

    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / META_NAME).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 0}))
    (tmp_path / "latest").write_text("step00000004")
    assert prepare_resume(tmp_path, _cfg(1, ["dist.zero_stage=0"]), 0, 1) == ("step00000004", False)
    with pytest.raises(RuntimeError, match=r"ZeRO stage 0 .* resume with dist\.zero_stage=0"):
        prepare_resume(tmp_path, _cfg(1), 0, 1)


def test_latest_ignores_a_checkpoint_without_its_completion_marker(tmp_path):
    from train.checkpoint import latest_tag

    (tmp_path / "step00000004").mkdir()
    (tmp_path / "latest").write_text("step00000004")  # written, but the tag never got its metadata file
    assert latest_tag(tmp_path) is None


# ----------------------------------------------------------------------------- stages on the fixtures


def test_cache_of_another_encoder_is_refused(train_overrides):
    from train import run
    from train.data import CacheMismatchError

    cfg = _cfg(1, train_overrides("refused", **{"llm.layer": 1}))
    with pytest.raises(CacheMismatchError, match=r"layer: cache 2 vs configured 1"):
        run(cfg)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def stage_results(train_overrides):
    """Stages 1 -> 2 -> 3 chained through their exports, one rank each (launcher local)."""
    from train import run

    s1 = run(_cfg(1, train_overrides("chain-s1")))
    s2 = run(_cfg(2, train_overrides("chain-s2", init_from=s1["export_dir"])))
    s3 = run(_cfg(3, train_overrides("chain-s3", init_from=s2["export_dir"])))
    return {1: s1, 2: s2, 3: s3}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_lowers_its_validation_loss(stage_results, stage):
    val = {int(k): v for k, v in stage_results[stage]["val_loss"].items()}
    first, last = val[0], val[max(val)]
    assert last < 0.9 * first, f"stage {stage}: val loss {first:.4f} -> {last:.4f}"


def test_stage3_keeps_the_frozen_adapter_and_trains_the_unet(stage_results):
    s2, s3 = _safetensors(Path(stage_results[2]["export_dir"])), _safetensors(Path(stage_results[3]["export_dir"]))
    adapter = [k for k in s2 if k.startswith("adapter/")]
    assert adapter and all(torch.equal(s2[k], s3[k]) for k in adapter)
    assert any(not torch.equal(s2[k], s3[k]) for k in s2 if k.startswith("unet/"))


def test_exported_folders_load_and_generate_in_any_language(stage_results, tiny_llm):
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.pipeline import OmniDiffusionPipeline

    llm = LLMTextEncoder(tiny_llm, max_length=512)
    for stage, result in stage_results.items():
        folder = Path(result["export_dir"])
        index = json.loads((folder / "model_index.json").read_text())
        assert index["conditioning"] == "llm_adapter"
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # safetensors only
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["stage"] == stage and lineage["snapshot"]["digest"] and lineage["caches"]["llm"]
        pipe = OmniDiffusionPipeline.from_pretrained(folder, llm=llm)
        prompts = ["一个红色的圆在左边", "a blue square on the right " * 12]  # Chinese; longer than one CLIP window
        images = pipe(prompts, num_inference_steps=3, output_type="np", seed=1)
        assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
        assert images.std() > 0


def test_a_checkpoint_folder_of_another_training_is_refused(stage_results, train_overrides):
    from train import run
    from train.inputs import TrainingError

    ckpt = Path(stage_results[1]["checkpoint_dir"])
    cfg = _cfg(1, train_overrides("chain-s1", **{"checkpoint.dir": str(ckpt), "optim.lr": 0.1}))
    with pytest.raises(TrainingError, match=r"differs in: config\.optim\.lr"):
        run(cfg)


def test_a_lower_adapter_lr_moves_the_adapter_less_and_the_unet_as_much(stage_results, train_overrides):
    """``diffusion.adapter_lr_scale``: stage 2 from the same stage-1 export, the adapter's AdamW group at a tenth of
    the rate. Adam's steps scale with the rate, so the adapter moves far less while the UNet moves as it did."""
    from train import run
    from train.engine import parameter_groups
    from train.model import StageModel

    init = Path(stage_results[1]["export_dir"])
    slow = run(_cfg(2, train_overrides("chain-s2-slow-adapter", init_from=str(init),
                                       **{"diffusion.adapter_lr_scale": 0.1})))
    start, full, low = _safetensors(init), _safetensors(Path(stage_results[2]["export_dir"])), _safetensors(Path(slow["export_dir"]))

    def moved(weights: dict, prefix: str) -> float:
        keys = [k for k in weights if k.startswith(prefix) and k in start and weights[k].is_floating_point()]
        assert keys, prefix
        return float(sum((weights[k].float() - start[k].float()).norm() for k in keys))

    assert moved(low, "adapter/") < 0.4 * moved(full, "adapter/")
    assert moved(low, "unet/") > 0.6 * moved(full, "unet/")
    # the groups themselves: the UNet at optim.lr, the adapter at a tenth; one plain list at scale 1
    model = StageModel(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), loss_fn=None)
    cfg = _cfg(2, ["diffusion.adapter_lr_scale=0.1"])
    groups = parameter_groups(model, cfg)
    assert [g["lr"] for g in groups] == pytest.approx([cfg.optim.lr, cfg.optim.lr * 0.1])
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["params"][0] is model.adapter.weight
    assert parameter_groups(model, _cfg(2)) == list(model.parameters())
    with pytest.raises(ConfigError, match="adapter_lr_scale"):
        _cfg(2, ["diffusion.adapter_lr_scale=0"])
