"""Fine-tuning (specialize/finetune.py on training/loop.py; training/sd_lora.py): the flags become the trainer's
config, a full and a LoRA fine-tune write loadable checkpoints and the manifest, adapters load with diffusers' own
loaders, a killed run resumes to the result of an uninterrupted one, and bad input is one line."""
import json
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_caption_set
from specialize.cli import main
from specialize.manifest import read_manifest


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
    """Four steps at batch 4 (one epoch of the 16 images), a checkpoint every two; later flags win."""
    return main(["--mode", "finetune", "--checkpoint", str(checkpoint), "--dataset", str(data),
                 "--data-root", str(tmp / "root"), "--out", str(tmp / "out"), "--batch-size", "4", "--device", "cpu",
                 "--max-steps", "4", "--save-every", "2", *extra])


def error_lines(err: str) -> list[str]:
    """The trainer logs its progress on stderr too; what went wrong is one line of its own."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def interrupted_at(call: int, function):
    """function, interrupted (as by Ctrl-C) at its call-th call: the step a killed run never finishes."""
    calls = []

    def wrapper(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return function(*args)
    return wrapper


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """A fixed denoiser call: latents at t=10 with fixed conditioning."""
    g = torch.Generator().manual_seed(1)
    config = unet.config
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=g)
    states = torch.randn(1, 5, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=states).sample


def test_the_flags_become_the_fine_tuning_config(base_checkpoint, caption_set, tmp_path):
    from models.checkpoint import read_config
    from specialize.cli import build_parser
    from specialize.finetune import check_flags, finetune_config

    def config(*argv):
        args = build_parser().parse_args(["--mode", "finetune", "--dataset", str(caption_set), *argv])
        return finetune_config(args, base_checkpoint, tmp_path / "finetune", check_flags(args))

    duet = config()
    t = duet.train
    assert (t.phases, t.diffusion_trains, t.lora_rank, t.batch_size, t.learning_rate) == (
        ["diffusion"], ["unet", "image_decoder"], 0, 64, 1e-3)
    assert (t.init_from, t.out_dir, t.run_name) == (str(base_checkpoint), str(tmp_path), "finetune")
    assert duet.sample.guidance_scale == 3.0 and duet.sample.steps == read_config(base_checkpoint).sample.steps
    lora = config("--method", "lora", "--rank", "4", "--alpha", "8", "--no-train-decoder", "--batch-size", "8",
                  "--lr", "2e-3", "--tuned-guidance-scale", "0", "--target-modules", "to_q,to_v")
    t = lora.train
    assert (t.lora_rank, t.lora_alpha, t.lora_targets, t.diffusion_trains) == (4, 8.0, ["to_q", "to_v"], ["unet"])
    assert (t.batch_size, t.diffusion_batch_size, t.diffusion_learning_rate) == (8, 8, 2e-3)
    assert lora.sample.guidance_scale == read_config(base_checkpoint).sample.guidance_scale   # 0: the base's
    sd = config("--backend", "sd")
    assert (sd.train.lora_rank, sd.train.batch_size) == (8, 32)


def test_a_full_fine_tune_writes_a_loadable_checkpoint_and_the_manifest(base_checkpoint, caption_set, tmp_path):
    from models.checkpoint import load_checkpoint

    assert finetune(tmp_path, base_checkpoint, caption_set, "--tuned-guidance-scale", "4.5") == 0
    out = tmp_path / "out" / "finetune"
    manifest = read_manifest(out)
    assert (manifest["backend"], manifest["method"], manifest["base"], manifest["steps"]) == (
        "duet", "full", str(base_checkpoint), 4)
    assert manifest["model"] == out / "checkpoint-000004" and "adapter" not in manifest
    assert manifest["trains"] == ["unet", "image_decoder"] and manifest["metrics"]["val_loss"] > 0
    tuned, base = load_checkpoint(manifest["model"]), load_checkpoint(base_checkpoint)
    assert tuned.config.sample.guidance_scale == 4.5     # the tuned model's own sampling default
    assert not torch.allclose(unet_output(tuned.diffusion.unet), unet_output(base.diffusion.unet), atol=1e-5)
    for module in ("image_encoder", "caption_decoder"):   # the encoders stay frozen: the latents keep their meaning
        for key, value in getattr(base, module).state_dict().items():
            assert torch.equal(value, getattr(tuned, module).state_dict()[key]), f"{module}.{key}"
    decoder = tuned.image_decoder.state_dict()
    assert any(not torch.equal(v, decoder[k]) for k, v in base.image_decoder.state_dict().items())


def test_a_killed_fine_tune_resumes_to_the_uninterrupted_result(base_checkpoint, caption_set, tmp_path, monkeypatch,
                                                                 capsys):
    from training import phases

    assert finetune(tmp_path / "whole", base_checkpoint, caption_set) == 0
    with monkeypatch.context() as patch:
        patch.setattr(phases.DiffusionPhase, "step", interrupted_at(4, phases.DiffusionPhase.step))
        assert finetune(tmp_path / "killed", base_checkpoint, caption_set) == 130
    assert "resume with --resume latest" in capsys.readouterr().err
    killed_run = tmp_path / "killed" / "out" / "finetune"
    assert (killed_run / "latest").read_text().strip() == "checkpoint-000002"
    assert finetune(tmp_path / "killed", base_checkpoint, caption_set, "--resume", "latest") == 0
    assert read_manifest(killed_run)["steps"] == 4
    whole = tmp_path / "whole" / "out" / "finetune" / "checkpoint-000004"
    for file in ("model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "unet_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(whole / file), load_file(killed_run / "checkpoint-000004" / file)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=f"{file}: {key}")


def test_resume_with_other_settings_is_refused(base_checkpoint, caption_set, tmp_path, capsys):
    assert finetune(tmp_path, base_checkpoint, caption_set, "--max-steps", "2") == 0
    capsys.readouterr()
    assert finetune(tmp_path, base_checkpoint, caption_set, "--resume", "latest", "--no-train-decoder") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: --resume") and "diffusion_trains" in line


def test_a_lora_fine_tune_writes_an_adapter_diffusers_loads_and_a_merged_model(base_checkpoint, caption_set,
                                                                               tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from models.checkpoint import load_checkpoint
    from models.lora import LORA_WEIGHT_NAME, apply_lora

    assert finetune(tmp_path, base_checkpoint, caption_set, "--method", "lora", "--rank", "4", "--lr", "1e-2",
                    "--merge") == 0
    out = tmp_path / "out" / "finetune"
    manifest = read_manifest(out)
    assert manifest["adapter"] == out / "checkpoint-000004" / LORA_WEIGHT_NAME and manifest["model"] == out / "merged"
    assert manifest["decoder_adapter"].is_file() and manifest["lora"]["rank"] == 4
    with safe_open(manifest["adapter"], "pt") as f:
        assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in f.keys())

    base, merged = load_checkpoint(base_checkpoint), load_checkpoint(manifest["model"])
    ours = apply_lora(load_checkpoint(base_checkpoint), manifest["adapter"])
    fresh = UNet2DConditionModel.from_pretrained(base_checkpoint / "unet")
    fresh.load_lora_adapter(str(manifest["adapter"].parent), prefix="unet", weight_name=LORA_WEIGHT_NAME)
    expected = unet_output(merged.diffusion.unet)
    assert not torch.allclose(expected, unet_output(base.diffusion.unet), atol=1e-4), "the adapter changes the UNet"
    for unet in (ours.diffusion.unet, load_checkpoint(out / "checkpoint-000004").diffusion.unet, fresh):
        torch.testing.assert_close(unet_output(unet), expected, atol=1e-5, rtol=1e-4)
    latents = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # the decoder's adapter too
        torch.testing.assert_close(ours.decode_latents(latents), merged.decode_latents(latents), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base.decode_latents(latents), merged.decode_latents(latents), atol=1e-4)


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


def test_stable_diffusion_lora_loads_with_the_pipelines_own_loader_and_resumes(caption_set, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from training import sd_lora

    sd = write_tiny_sd(tmp_path / "sd")

    def run(tmp: Path, *extra: str) -> int:
        return main(["--mode", "finetune", "--backend", "sd", "--model-path", str(sd), "--dataset", str(caption_set),
                     "--data-root", str(tmp / "root"), "--out", str(tmp / "out"), "--batch-size", "4", "--rank", "4",
                     "--max-steps", "4", "--save-every", "2", "--lr", "1e-2", "--train-text-encoder", "--merge",
                     "--target-modules", "to_q,to_k,to_v,to_out.0,conv1,conv2",  # convs: the PEFT-layout file
                     "--device", "cpu", *extra])

    assert run(tmp_path / "whole") == 0
    manifest = read_manifest(tmp_path / "whole" / "out" / "finetune")
    assert (manifest["backend"], manifest["method"], manifest["trains"]) == ("sd", "lora", ["unet", "text_encoder"])

    def image(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of a red dress", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    adapted = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    adapted.load_lora_weights(str(manifest["adapter"].parent))
    merged = image(StableDiffusionPipeline.from_pretrained(manifest["model"], local_files_only=True))
    torch.testing.assert_close(image(adapted), merged, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(image(StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)), merged,
                              atol=1e-5)

    with monkeypatch.context() as patch:
        patch.setattr(sd_lora, "denoising_loss", interrupted_at(4, sd_lora.denoising_loss))
        assert run(tmp_path / "killed") == 130
    assert run(tmp_path / "killed", "--resume", "latest") == 0
    resumed = read_manifest(tmp_path / "killed" / "out" / "finetune")
    a, b = load_file(manifest["adapter"]), load_file(resumed["adapter"])
    assert resumed["steps"] == 4 and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("case", ["missing_checkpoint", "rank_zero", "empty_dataset", "text_encoder_on_duet",
                                  "full_on_sd", "save_every_zero"])
def test_bad_input_is_one_line_and_exit_2(case, base_checkpoint, caption_set, tmp_path, capsys):
    checkpoint, data, extra = base_checkpoint, caption_set, {
        "rank_zero": ["--method", "lora", "--rank", "0"], "text_encoder_on_duet": ["--train-text-encoder"],
        "full_on_sd": ["--backend", "sd", "--model-path", str(tmp_path), "--full"],
        "save_every_zero": ["--save-every", "0"]}.get(case, [])
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "empty_dataset":
        data = tmp_path / "empty"
        for split in ("train", "val"):
            (data / split).mkdir(parents=True)
            (data / f"captions_{split}.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert finetune(tmp_path, checkpoint, data, *extra) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
