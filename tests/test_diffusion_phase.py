"""The diffusion objectives and conditioning on tiny configs, and the run's switch from joint training to the
diffusion phase on frozen, cached features: what trains, cached states equal live ones, resume across the switch."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main as cli
from configs.loading import load_config
from models.diffusion import LatentDiffusion, sampling_scheduler
from models.duet import DuetModel
from models.text_encoder import load_text_backbone
from training import phases
from training.features import build_frozen_features, cached_caption_rows
from training.optim import PLAN_AT

# 32 images, batch 8: 3 joint steps, then 5 diffusion-phase steps; checkpoints at 3 and 6 (and 8).
PHASED = {"data.limit_train": 32, "data.caption_mode": "random", "train.max_steps": 8, "train.joint_steps": 3,
          "train.save_every_steps": 3, "train.val_every_steps": 4, "train.diffusion_batch_size": 12,
          "model.unet_coord_channels": "true", "model.unet_pooled_embedding": "true",
          "model.diffusion_objective": "v_prediction"}
FROZEN_PREFIXES = ("image_encoder.", "text_encoder.embed.", "logit_scale")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def settings(tiny_bert, data_root, out_dir, **extra) -> dict:
    return {"model.text_encoder": str(tiny_bert), "data.root": str(data_root), "train.out_dir": str(out_dir),
            **PHASED, **extra}


def cli_args(values: dict, *more: str) -> list[str]:
    return ["--config", "tiny", "--set", *[f"{k}={v}" for k, v in values.items()], *more]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_diffusion(tiny_bert, objective: str, **model_flags) -> LatentDiffusion:
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "model.diffusion_objective": objective,
                               **{f"model.{k}": v for k, v in model_flags.items()}})
    torch.manual_seed(0)
    return LatentDiffusion(cfg.model, cfg.train.diffusion_timesteps)


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction"])
def test_each_objective_learns_a_fixed_batch(tiny_bert, objective):
    diffusion = tiny_diffusion(tiny_bert, objective, unet_coord_channels=True, unet_pooled_embedding=True)
    torch.manual_seed(1)
    latents, states = torch.randn(8, 4, 4, 4), torch.randn(8, 5, 32)
    mask, pooled = torch.ones(8, 5, dtype=torch.long), torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=3e-3)

    def mean_loss(n: int) -> float:
        with torch.random.fork_rng():
            torch.manual_seed(2)
            with torch.no_grad():
                return sum(float(diffusion.training_loss(latents, states, mask, pooled)) for _ in range(n)) / n

    before = mean_loss(8)
    for _ in range(60):
        loss = diffusion.training_loss(latents, states, mask, pooled)
        assert loss.ndim == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mean_loss(8) < 0.8 * before


@pytest.mark.parametrize("objective, scheduler", [("v_prediction", "ddim"), ("v_prediction", "dpm++"),
                                                  ("epsilon", "euler"), ("epsilon", "euler_a"), ("epsilon", "ddpm")])
def test_sampling_shapes_with_every_conditioning(tiny_bert, objective, scheduler):
    diffusion = tiny_diffusion(tiny_bert, objective, unet_coord_channels=True, unet_pooled_embedding=True)
    assert diffusion.unet.config.in_channels == 4 + 2 and diffusion.unet.config.out_channels == 4
    sampler = sampling_scheduler(scheduler, diffusion.noise_scheduler)
    states, mask, pooled = torch.randn(3, 5, 32), torch.ones(3, 5, dtype=torch.long), torch.randn(3, 32)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out = diffusion.sample(states, mask, (4, 4, 4), sampler, 3, 2.0, generators, pooled=pooled)
    assert out.shape == (3, 4, 4, 4) and torch.isfinite(out).all()
    # batched equals one by one, with guidance and the pooled embedding
    one = diffusion.sample(states[1:2], mask[1:2], (4, 4, 4), sampling_scheduler(scheduler, diffusion.noise_scheduler),
                           3, 2.0, [torch.Generator().manual_seed(1)], pooled=pooled[1:2])
    torch.testing.assert_close(one, out[1:2], atol=1e-5, rtol=1e-3)   # Euler works at sigma ~10: relative rounding


def test_trailing_spacing_starts_at_pure_noise(tiny_bert):
    noise = tiny_diffusion(tiny_bert, "v_prediction").noise_scheduler
    trailing, leading = sampling_scheduler("ddim", noise, "trailing"), sampling_scheduler("ddim", noise, "leading")
    trailing.set_timesteps(5)
    leading.set_timesteps(5)
    last = noise.config.num_train_timesteps - 1
    assert int(trailing.timesteps[0]) == last > int(leading.timesteps[0])


def test_padding_does_not_change_the_text_condition(tiny_bert):
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "model.unet_pooled_embedding": "true"})
    model = DuetModel.build(cfg).eval()
    short, padded = model.tokenize(["a red circle"], max_length=8), model.tokenize(["a red circle"], max_length=16)
    states_a, pooled_a = model.text_condition(**short)
    states_b, pooled_b = model.text_condition(**padded)
    torch.testing.assert_close(pooled_a, pooled_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(states_a, states_b[:, :8], atol=1e-5, rtol=1e-4)
    assert states_b[:, 8:].abs().max() == 0  # zeroed past the mask, so a pooled readout ignores padding


def test_cached_features_equal_live_ones(tiny_bert, data_root):
    from data.datasets import build_datasets, caption_token_ids

    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "data.root": str(data_root)})
    bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
    train, _ = build_datasets(cfg, tokenizer)
    cfg.model.caption_vocab_size = len(caption_token_ids(train))
    model = DuetModel(cfg, bert, tokenizer)
    model.latent_scale.fill_(1.7)
    features = build_frozen_features(model, train, 2, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert len(features) == 2 * train.num_images and features.readable.all()
    model.eval()
    with torch.no_grad():
        images = torch.stack([train.image_tensor(i) for i in range(train.num_images)])
        torch.testing.assert_close(features.latents, model.encode_latents(images), atol=1e-5, rtol=1e-4)
        rows = cached_caption_rows(train.caption_offsets, 2)
        ids = torch.from_numpy(train.input_ids[rows].astype("int64"))
        mask = torch.from_numpy(train.attention_mask[rows].astype("int64"))
        live = model.text_encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
        width = features.hidden.shape[1]
        assert int(mask.sum(1).max()) == width
        torch.testing.assert_close(features.hidden.float(), live[:, :width], atol=2e-3, rtol=2e-3)
        # the states the UNet sees from the cache are the live text_condition's
        embeds, states = model.text_encoder.heads(features.hidden.float(), features.mask)
        live_states, live_pooled = model.text_condition(ids[:, :width], mask[:, :width])
        torch.testing.assert_close(states, live_states, atol=5e-3, rtol=5e-3)
    assert features.image.tolist() == train.index.caption_image[rows].tolist()


@pytest.fixture(scope="module")
def phased_run(tiny_bert, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("phased")
    assert cli.main(cli_args(settings(tiny_bert, data_root, out))) == 0
    return out / "embedded"


def test_the_run_switches_to_the_diffusion_phase(phased_run):
    rows = [r for r in rows_of(phased_run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    joint, diffusion = rows[:3], rows[3:]
    assert all("cont" in r and r["diff"] == 0 for r in joint)           # the UNet waits for the switch
    assert all("cont" not in r and r["diff"] > 0 and r["cap"] > 0 and r["img_rec"] > 0 for r in diffusion)
    at_switch = load_file(phased_run / "checkpoint-000003" / "model.safetensors")
    final = load_file(phased_run / "checkpoint-000008" / "model.safetensors")
    for key, value in at_switch.items():
        if key.startswith(FROZEN_PREFIXES):
            torch.testing.assert_close(final[key], value, atol=0, rtol=0)
    for prefix in ("caption_decoder.", "image_decoder.", "text_encoder.to_states."):
        assert any(not torch.equal(final[k], v) for k, v in at_switch.items() if k.startswith(prefix)), prefix
    unet_a = load_file(phased_run / "checkpoint-000003" / "unet" / "diffusion_pytorch_model.safetensors")
    unet_b = load_file(phased_run / "checkpoint-000008" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert [r["step"] for r in rows_of(phased_run) if "val_loss" in r] == [4, 8]


@pytest.mark.parametrize("killed_at, resumed_from", [pytest.param(2, None, id="before-the-switch"),
                                                     pytest.param(8, 6, id="in-the-diffusion-phase")])
def test_resume_across_the_switch_matches_an_uninterrupted_run(phased_run, tiny_bert, data_root, tmp_path,
                                                               monkeypatch, killed_at, resumed_from):
    values = settings(tiny_bert, data_root, tmp_path, **({"train.save_every_steps": 1} if resumed_from is None else {}))
    joint_step, diffusion_step, calls = phases.JointPhase.step, phases.DiffusionPhase.step, []

    def counted(original):
        def step(self, *args):
            calls.append(1)
            if len(calls) == killed_at:
                raise KeyboardInterrupt
            return original(self, *args)
        return step

    with monkeypatch.context() as patch:
        patch.setattr(phases.JointPhase, "step", counted(joint_step))
        patch.setattr(phases.DiffusionPhase, "step", counted(diffusion_step))
        assert cli.main(cli_args(values)) == 130
    run_dir = tmp_path / "embedded"
    resumed_from = resumed_from or killed_at - 1
    assert (run_dir / "latest").read_text().strip() == f"checkpoint-{resumed_from:06d}"
    assert cli.main(cli_args(values, "--resume", "latest")) == 0
    expected = {r["step"]: r["loss"] for r in rows_of(phased_run) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in rows_of(run_dir) if "loss" in r}
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_the_time_budget_plans_the_diffusion_phase(tiny_bert, data_root, tmp_path, capsys):
    values = settings(tiny_bert, data_root, tmp_path, **{"train.max_steps": 0, "train.epochs": 400,
                                                         "train.max_minutes": 0.5, "train.val_every_steps": 0})
    assert cli.main(cli_args(values)) == 0
    err = capsys.readouterr().err
    assert "diffusion phase: " in err and "planned to end at step" in err
    steps = [r["step"] for r in rows_of(tmp_path / "embedded") if "loss" in r]
    assert 3 + PLAN_AT[0] <= steps[-1] < 400 * 4


def test_the_plan_is_renewed_every_few_hundred_steps():
    from training.optim import plan_due

    # early (the first steps run slow), then regularly: a machine that slows mid-run still ends on time
    assert [n for n in range(1, 1300) if plan_due(n)] == [10, 60, 300, 600, 900, 1200]


# -- a fine-tune: the diffusion phase alone, from a trained checkpoint, on a domain's captioned images ------------

@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    from conftest import write_caption_set

    return write_caption_set(tmp_path_factory.mktemp("domain") / "blocks")


def finetune_args(base: Path, domain: Path, out: Path, data_root: Path, *more: str, **extra) -> list[str]:
    values = {"train.init_from": base, "data.dataset": domain, "data.root": data_root, "train.out_dir": out,
              "train.max_steps": 4, "train.max_minutes": 0, "train.batch_size": 4, "train.diffusion_batch_size": 4,
              "train.image_decoder_batch_size": 4, "train.save_every_steps": 2, "train.val_batches": 1,
              "train.log_every_steps": 1, **extra}
    return ["--config", "finetune", "--set", *[f"{k}={v}" for k, v in values.items()], *more]


def run_folder(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(prefix))


def test_a_fine_tune_trains_the_unet_and_decoder_on_the_frozen_encoders(phased_run, domain, data_root, tmp_path,
                                                                       capsys):
    base = phased_run / "checkpoint-000008"
    assert cli.main(finetune_args(base, domain, tmp_path, data_root)) == 0
    assert "computed and written to" in capsys.readouterr().err
    run = run_folder(tmp_path)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == json.loads((base / "config.json").read_text())["model"]   # the base's model section
    rows = [r for r in rows_of(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["diff"] > 0 and r["img_rec"] > 0 and "cap" not in r and "cont" not in r for r in rows)
    before, after = load_file(base / "model.safetensors"), load_file(run / "checkpoint-000004" / "model.safetensors")
    for prefix in ("image_encoder.", "text_encoder.embed.", "caption_decoder.", "logit_scale"):
        assert not changed(before, after, prefix), prefix
    assert changed(before, after, "image_decoder.") and changed(before, after, "text_encoder.to_states.")
    unet_before = load_file(base / "unet_ema" / "diffusion_pytorch_model.safetensors")   # sampling's UNet
    unet_after = load_file(run / "checkpoint-000004" / "unet" / "diffusion_pytorch_model.safetensors")
    assert changed(unet_before, unet_after, "")
    # A second fine-tune of the same base on the same data reads the features the first one wrote.
    assert cli.main(finetune_args(base, domain, tmp_path / "again", data_root)) == 0
    assert "read from" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_killed_fine_tune_resumes_to_the_same_losses(phased_run, domain, data_root, tmp_path, monkeypatch, lora):
    base = phased_run / "checkpoint-000008"
    extra = {"train.lora_rank": 4} if lora else {}
    assert cli.main(finetune_args(base, domain, tmp_path / "whole", data_root, **extra)) == 0
    original, calls = phases.DiffusionPhase.step, []

    def killed(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self)

    args = finetune_args(base, domain, tmp_path / "killed", data_root, **extra)
    with monkeypatch.context() as patch:
        patch.setattr(phases.DiffusionPhase, "step", killed)
        assert cli.main(args) == 130
    assert cli.main([*args, "--resume", "latest"]) == 0
    expected = {r["step"]: r["loss"] for r in rows_of(run_folder(tmp_path / "whole")) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in rows_of(run_folder(tmp_path / "killed")) if "loss" in r}
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_a_lora_fine_tune_keeps_the_base_and_diffusers_loads_its_adapter(phased_run, domain, data_root, tmp_path):
    from diffusers import UNet2DConditionModel

    from models.checkpoint import load_checkpoint
    from models.lora import DECODER_WEIGHT_NAME, LORA_WEIGHT_NAME

    base = phased_run / "checkpoint-000008"
    assert cli.main(finetune_args(base, domain, tmp_path, data_root, **{"train.lora_rank": 4})) == 0
    checkpoint = run_folder(tmp_path) / "checkpoint-000004"
    assert (checkpoint / LORA_WEIGHT_NAME).is_file() and (checkpoint / DECODER_WEIGHT_NAME).is_file()
    assert not (checkpoint / "unet_ema").exists()
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    unet_before, unet_after = load_file(base / "unet_ema" / "diffusion_pytorch_model.safetensors"), load_file(
        checkpoint / unet_file)
    assert not changed(unet_before, unet_after, "")                                    # the base, untouched
    assert not changed(load_file(base / "model.safetensors"), load_file(checkpoint / "model.safetensors"), "")

    tuned, plain = load_checkpoint(checkpoint), load_checkpoint(base)                  # adapters fused on load
    diffusers_unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    diffusers_unet.load_lora_adapter(str(checkpoint), prefix="unet", weight_name=LORA_WEIGHT_NAME)
    g = torch.Generator().manual_seed(0)
    config = tuned.diffusion.unet.config
    sample = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=g)
    states, pooled = torch.randn(2, 5, config.cross_attention_dim, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        ours = tuned.diffusion.unet(sample, torch.tensor([10, 500]), states, class_labels=pooled).sample
        theirs = diffusers_unet(sample, torch.tensor([10, 500]), states, class_labels=pooled).sample
        untuned = plain.diffusion.unet(sample, torch.tensor([10, 500]), states, class_labels=pooled).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert (ours - untuned).abs().max() > 1e-4
