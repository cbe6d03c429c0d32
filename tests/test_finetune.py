"""Fine-tuning (specialize/finetune.py, models/lora.py): LoRA keeps the base, adapters reload (ours and diffusers'
loaders), resume, full fine-tuning, the Stable Diffusion backend, and bad input."""
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from specialize.launcher import main

COLOURS = {"red": (235, 45, 40), "green": (60, 200, 70), "blue": (60, 110, 245), "yellow": (245, 220, 50)}
GARMENTS = ("dress", "bag")


def write_caption_set(folder: Path, count: int = 16, size: int = 16) -> Path:
    """A COCO-format split pair of tinted blocks ("a photo of a red dress"), labelled like the fashion set."""
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            label, tint = i % 2, list(COLOURS)[i % 4]
            pixels = np.zeros((size, size, 3), np.uint8)
            rows = slice(2, 14) if label == 0 else slice(6, 12)  # tall "dress", short "bag"
            pixels[rows, 4:12] = COLOURS[tint]
            Image.fromarray(pixels).save(folder / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "label": label, "label_name": GARMENTS[label],
                           "tint": tint})
            annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"a photo of a {tint} {GARMENTS[label]}"})
        (folder / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, tiny_bert) -> Path:
    from configs.loading import load_config
    from models.checkpoint import save_checkpoint
    from models.duet import DuetModel

    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert)})
    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(cfg), tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def caption_set(tmp_path_factory) -> Path:
    return write_caption_set(tmp_path_factory.mktemp("captions") / "blocks")


def finetune(tmp: Path, checkpoint: Path, data: Path, *extra: str) -> int:
    """A LoRA fine-tune of the UNet alone unless extra says otherwise (later flags win)."""
    return main(["--mode", "finetune", "--checkpoint", str(checkpoint), "--dataset", str(data),
                 "--data-root", str(tmp / "root"), "--out", str(tmp / "out"), "--batch-size", "4", "--rank", "4",
                 "--device", "cpu", "--save-every", "2", "--method", "lora", "--no-train-decoder", *extra])


def test_each_backend_has_its_own_defaults():
    from specialize.finetune import settings_from_args
    from specialize.launcher import build_parser

    parse = lambda *argv: settings_from_args(build_parser().parse_args(["--mode", "finetune", *argv]))  # noqa: E731
    duet, sd = parse(), parse("--backend", "sd")
    assert (duet.full, duet.train_decoder, duet.batch_size, duet.learning_rate, duet.guidance_scale) == (
        True, True, 64, 1e-3, 3.0)
    assert (sd.full, sd.train_decoder, sd.batch_size, sd.learning_rate, sd.guidance_scale) == (False, False, 32, 1e-3, 0)
    assert parse("--backend", "sd", "--full").learning_rate == 5e-5
    lora = parse("--method", "lora", "--no-train-decoder", "--batch-size", "8")
    assert (lora.full, lora.train_decoder, lora.batch_size) == (False, False, 8)


def test_the_cosine_is_planned_to_end_with_the_time_budget(base_checkpoint, caption_set, tmp_path):
    from specialize.finetune import FineTuner, FinetuneSettings, build_train_set
    from specialize.tunable import DuetTunable
    from models.checkpoint import load_checkpoint

    tunable = DuetTunable(load_checkpoint(base_checkpoint), base_checkpoint)
    args = type("Args", (), {"dataset": str(caption_set), "data_root": str(tmp_path / "root")})
    settings = FinetuneSettings(rank=4, batch_size=4, max_minutes=60, save_every=0, warmup_steps=2)
    tuner = FineTuner(tunable, build_train_set(tunable, args, settings), settings, tmp_path / "out",
                      torch.device("cpu"))
    assert tuner.planned_steps is None and tuner._lr_multiplier(50) == 1.0   # constant until a plan exists
    tuner.step, tuner.elapsed = 10, 10.0
    tuner._plan([1.0] * 10)                   # 1 s a step, 59m50s left: about 3,590 more steps
    assert 3500 < tuner.planned_steps < 3700
    lrs = [tuner._lr_multiplier(step) for step in (0, 100, 1800, tuner.planned_steps)]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3] and abs(lrs[3] - 0.05) < 1e-6
    constant = FineTuner(tunable, tuner.train_set, FinetuneSettings(full=True, batch_size=4, lr_schedule="constant"),
                         tmp_path / "out2", torch.device("cpu"))
    constant._plan([1.0] * 10)
    assert constant.planned_steps is None and constant._lr_multiplier(1000) == 1.0


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """A fixed denoiser call: (1, 4, 4, 4) latents at t=10 with fixed conditioning."""
    g = torch.Generator().manual_seed(1)
    config = unet.config
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=g)
    states = torch.randn(1, 5, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=states).sample


def test_lora_trains_only_the_adapter_and_leaves_the_base_bit_identical(base_checkpoint, caption_set, tmp_path):
    from models.checkpoint import load_checkpoint
    from specialize.finetune import FineTuner, FinetuneSettings, build_train_set
    from specialize.tunable import DuetTunable

    tunable = DuetTunable(load_checkpoint(base_checkpoint), base_checkpoint)
    before = {k: v.clone() for k, v in tunable.model.state_dict().items()}
    args = type("Args", (), {"dataset": str(caption_set), "data_root": str(tmp_path / "root")})
    settings = FinetuneSettings(rank=4, batch_size=4, max_steps=3, save_every=0, warmup_steps=1)
    train_set = build_train_set(tunable, args, settings)
    tuner = FineTuner(tunable, train_set, settings, tmp_path / "out", torch.device("cpu"))
    assert tuner.params and all(".lora_A." in name or ".lora_B." in name for name in tuner.params)
    tuner.train()
    after = tunable.model.state_dict()
    lora_b = [p for name, p in tuner.params.items() if ".lora_B." in name]
    assert any(p.abs().sum() > 0 for p in lora_b), "lora_B starts at zero and must have moved"
    for key, value in before.items():
        live = key if key in after else ".base_layer.".join(key.rsplit(".", 1))  # peft wraps to_q as to_q.base_layer
        assert torch.equal(after[live], value), key


def test_adapter_reloads_with_our_loader_diffusers_loader_and_merged(base_checkpoint, caption_set, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from models.checkpoint import load_checkpoint
    from models.lora import LORA_WEIGHT_NAME, apply_lora

    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "3", "--lr", "1e-2", "--merge") == 0
    out = tmp_path / "out" / "finetune"
    report = json.loads((out / "finetune_report.json").read_text())
    size = report["outputs"]["adapter_size"]
    assert size["adapter_bytes"] == (out / LORA_WEIGHT_NAME).stat().st_size and 0 < size["ratio"] < 0.2
    with safe_open(out / LORA_WEIGHT_NAME, "pt") as f:
        assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in f.keys())

    merged = unet_output(load_checkpoint(out / "merged").diffusion.unet)
    ours = unet_output(apply_lora(load_checkpoint(base_checkpoint), out, scale=1.0).diffusion.unet)
    live = unet_output(apply_lora(load_checkpoint(base_checkpoint), out, fuse=False).diffusion.unet)
    fresh = UNet2DConditionModel.from_pretrained(base_checkpoint / "unet")
    fresh.load_lora_adapter(str(out), prefix="unet", weight_name=LORA_WEIGHT_NAME)  # diffusers' own loader
    base = unet_output(load_checkpoint(base_checkpoint).diffusion.unet)
    assert not torch.allclose(merged, base, atol=1e-4), "the adapter must change the UNet"
    for other in (ours, live, unet_output(fresh)):
        torch.testing.assert_close(other, merged, atol=1e-5, rtol=1e-4)
    # scale 0 is the base model again
    torch.testing.assert_close(unet_output(apply_lora(load_checkpoint(base_checkpoint), out, 0.0).diffusion.unet),
                               base, atol=1e-6, rtol=0)


def test_text_encoder_lora_round_trips(base_checkpoint, caption_set, tmp_path):
    from safetensors import safe_open

    from models.checkpoint import load_checkpoint
    from models.lora import LORA_WEIGHT_NAME, apply_lora

    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "2", "--lr", "1e-2",
                    "--train-text-encoder", "--merge") == 0
    out = tmp_path / "out" / "finetune"
    with safe_open(out / LORA_WEIGHT_NAME, "pt") as f:
        assert any(k.startswith("text_encoder.") and "lora_linear_layer" in k for k in f.keys())
    merged, adapted = load_checkpoint(out / "merged"), apply_lora(load_checkpoint(base_checkpoint), out)
    tokens = merged.tokenize(["a photo of a red dress"])
    torch.testing.assert_close(adapted.text_states(**tokens), merged.text_states(**tokens), atol=1e-5, rtol=1e-4)
    base = load_checkpoint(base_checkpoint)
    assert not torch.allclose(base.text_states(**tokens), merged.text_states(**tokens), atol=1e-4)


def test_decoder_lora_adapts_the_decoder_only(base_checkpoint, caption_set, tmp_path):
    from models.checkpoint import load_checkpoint
    from models.lora import DECODER_WEIGHT_NAME, apply_lora

    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "2", "--lr", "1e-2",
                    "--train-decoder", "--merge") == 0
    out = tmp_path / "out" / "finetune"
    size = json.loads((out / "finetune_report.json").read_text())["outputs"]["adapter_size"]
    assert DECODER_WEIGHT_NAME in size["files"] and size["adapter_bytes"] == sum(size["files"].values())
    base, merged = load_checkpoint(base_checkpoint), load_checkpoint(out / "merged")
    adapted = apply_lora(load_checkpoint(base_checkpoint), out)
    latents = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapted.decode_latents(latents), merged.decode_latents(latents), atol=1e-5,
                                   rtol=1e-4)
        assert not torch.allclose(base.decode_latents(latents), merged.decode_latents(latents), atol=1e-4)
    for key, value in base.image_encoder.state_dict().items():  # the latents keep their meaning
        assert torch.equal(value, merged.image_encoder.state_dict()[key])


def test_resume_continues_at_the_same_step_and_matches_an_uninterrupted_run(base_checkpoint, caption_set, tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert finetune(straight, base_checkpoint, caption_set, "--max-steps", "4") == 0
    assert finetune(split, base_checkpoint, caption_set, "--max-steps", "2") == 0
    assert (split / "out" / "finetune" / "latest").read_text().strip() == "checkpoint-000002"
    assert finetune(split, base_checkpoint, caption_set, "--max-steps", "4", "--resume", "latest") == 0
    report = json.loads((split / "out" / "finetune" / "finetune_report.json").read_text())
    assert report["resumed_from_step"] == 2 and report["steps"] == 4
    a = load_file(straight / "out" / "finetune" / "pytorch_lora_weights.safetensors")
    b = load_file(split / "out" / "finetune" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_resume_with_other_settings_is_refused(base_checkpoint, caption_set, tmp_path, capsys):
    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "2") == 0
    capsys.readouterr()
    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "4", "--resume", "latest",
                    "--rank", "8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume") and "rank" in err[0]


def test_nan_losses_stop_the_run_like_training_does(base_checkpoint, caption_set, tmp_path, capsys, monkeypatch):
    from specialize.tunable import DuetTunable

    monkeypatch.setattr(DuetTunable, "loss", lambda self, batch, train_text, train_decoder=False:
                        torch.full((), float("nan"), requires_grad=True))
    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "10") == 2
    err = capsys.readouterr().err
    assert err.count("warning: non-finite loss") == 5
    assert "error: training diverged" in err and "--lr" in err


def test_full_finetuning_changes_the_unet_and_saves_a_loadable_checkpoint(base_checkpoint, caption_set, tmp_path):
    from models.checkpoint import load_checkpoint

    assert finetune(tmp_path, base_checkpoint, caption_set, "--full", "--max-steps", "2", "--lr", "1e-3",
                    "--tuned-guidance-scale", "4.5") == 0
    tuned = load_checkpoint(tmp_path / "out" / "finetune" / "model")
    assert tuned.config.sample.guidance_scale == 4.5     # the tuned model's own sampling default
    base = load_checkpoint(base_checkpoint)
    changed = [k for k, v in base.diffusion.unet.state_dict().items()
               if not torch.equal(v, tuned.diffusion.unet.state_dict()[k])]
    assert len(changed) > len(base.diffusion.unet.state_dict()) // 2
    for key, value in base.image_encoder.state_dict().items():  # the autoencoder stays frozen
        assert torch.equal(value, tuned.image_encoder.state_dict()[key])


def write_tiny_sd(folder: Path) -> Path:
    """A random Stable Diffusion pipeline at 16 px (diffusers' get_dummy_components sizes, a character BPE)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-,.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(4, 8), latent_channels=4, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=len(vocab), max_position_embeddings=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def test_stable_diffusion_lora_loads_with_the_pipelines_own_loader(caption_set, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = write_tiny_sd(tmp_path / "sd")
    assert main(["--mode", "finetune", "--backend", "sd", "--model-path", str(sd), "--dataset", str(caption_set),
                 "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "out"), "--batch-size", "4",
                 "--rank", "4", "--max-steps", "2", "--lr", "1e-2", "--train-text-encoder", "--merge",
                 "--target-modules", "to_q,to_k,to_v,to_out.0,conv1,conv2",  # convs: the PEFT-layout file
                 "--device", "cpu"]) == 0
    out = tmp_path / "out" / "finetune"

    def image(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of a red dress", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    adapted = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    adapted.load_lora_weights(str(out))
    merged = image(StableDiffusionPipeline.from_pretrained(out / "merged", local_files_only=True))
    torch.testing.assert_close(image(adapted), merged, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(image(StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)), merged,
                              atol=1e-5)


@pytest.mark.parametrize("case", ["missing_checkpoint", "rank_zero", "empty_dataset"])
def test_bad_input_is_one_line_and_exit_2(case, base_checkpoint, caption_set, tmp_path, capsys):
    checkpoint, data, extra = base_checkpoint, caption_set, []
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "rank_zero":
        extra = ["--rank", "0"]
    else:
        data = tmp_path / "empty"
        (data / "train").mkdir(parents=True)
        (data / "captions_train.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert finetune(tmp_path, checkpoint, data, "--max-steps", "1", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
