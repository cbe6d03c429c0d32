"""Checkpoint folders: save -> load gives the same model, HF subfolders load with the plain libraries, damaged or
mismatched folders are refused with one line, and writes are atomic."""
import json
import os
import random
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import AutoModel, AutoTokenizer

from configs.errors import UserError
from configs.loading import load_config
from models import checkpoint as checkpoint_module
from models.checkpoint import (find_latest_checkpoint, load_checkpoint, load_trainer_state, read_config,
                               save_checkpoint)
from models.duet import DuetModel

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a small green triangle"]


def make_model(tiny_bert) -> DuetModel:
    """A tiny model with a reduced caption vocabulary and a latent scale that moved off 1."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ids = sorted({i for c in CAPTIONS for i in tokenizer(c)["input_ids"]}
                 | {tokenizer.pad_token_id, tokenizer.unk_token_id})
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "model.caption_vocab_size": len(ids)})
    torch.manual_seed(0)
    model = DuetModel.build(cfg)
    model.caption_decoder.set_vocabulary(ids)
    with torch.no_grad():
        model.train()(batch_for(model))  # tracks latent_scale
        model.image_encoder.embed.weight.mul_(1.5)
    return model.eval()


def batch_for(model: DuetModel) -> dict:
    images = torch.rand(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"images": images, **model.tokenize(CAPTIONS)}


def outputs(model: DuetModel) -> dict:
    """Everything a user gets from a model, computed deterministically."""
    batch = batch_for(model)
    with torch.no_grad():
        torch.manual_seed(3)
        losses = model(batch)
        return {
            "image_embeds": model.encode_image(batch["images"]),
            "text_embeds": model.encode_text(batch["input_ids"], batch["attention_mask"]),
            "captions": model.caption(batch["images"]),
            "generated": model.generate_images(CAPTIONS[:2], [5, 6], steps=2, scheduler="ddim"),
            "loss": losses["loss"],
        }


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory):
    """(model, its EMA UNet weights, checkpoint folder); the EMA differs from the live UNet."""
    model = make_model(tiny_bert)
    unet = model.diffusion.unet
    ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
    ema_weights = [p.detach().clone() for p in unet.parameters()]
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"step": 7, "optimizer": {"lr": torch.tensor([1e-3])}, "rng": {"torch": torch.get_rng_state(),
                                                                         "python": random.getstate()}}
    folder = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "checkpoint-000007", ema=ema,
                             trainer_state=state)
    return model, ema_weights, folder


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a["captions"] == b["captions"]
    for key in ("image_embeds", "text_embeds", "generated", "loss"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_save_then_load_gives_identical_outputs(saved):
    model, _, folder = saved
    loaded = load_checkpoint(folder, use_ema=False)
    assert not loaded.training and loaded.config == model.config
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert float(loaded.latent_scale) != 1.0
    assert_same_outputs(outputs(model), outputs(loaded))


def test_use_ema_loads_the_averaged_unet(saved):
    model, ema_weights, folder = saved
    averaged = list(load_checkpoint(folder, use_ema=True).diffusion.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(averaged, ema_weights))
    assert not all(torch.equal(a, b) for a, b in zip(averaged, model.diffusion.unet.parameters()))


def test_hf_subfolders_load_with_the_plain_libraries(saved):
    model, _, folder = saved
    bert = AutoModel.from_pretrained(folder / "text_encoder")
    assert all(torch.equal(v, model.text_encoder.bert.state_dict()[k]) for k, v in bert.state_dict().items())
    tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")
    assert tokenizer(CAPTIONS)["input_ids"] == model.tokenizer(CAPTIONS)["input_ids"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert all(torch.equal(v, model.diffusion.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    assert torch.equal(scheduler.betas, model.diffusion.noise_scheduler.betas)
    assert read_config(folder) == model.config


@pytest.mark.parametrize("damaged", ["model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                     "text_encoder/model.safetensors", "scheduler/scheduler_config.json"])
def test_truncated_file_is_refused(saved, tmp_path, damaged):
    folder = copy_of(saved[2], tmp_path)
    data = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged") as err:
        load_checkpoint(folder, use_ema=False)
    assert "\n" not in str(err.value)


def test_truncated_trainer_state_is_refused(saved, tmp_path):
    assert load_trainer_state(saved[2])["step"] == 7
    folder = copy_of(saved[2], tmp_path)
    data = (folder / "trainer_state.pt").read_bytes()
    (folder / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_trainer_state(folder)


def test_config_with_unknown_key_or_other_version_is_refused(saved, tmp_path):
    folder = copy_of(saved[2], tmp_path)
    good = json.loads((folder / "config.json").read_text())

    def write(tree):
        (folder / "config.json").write_text(json.dumps(tree))

    write({**good, "model": {**good["model"], "use_magic": True}})
    with pytest.raises(UserError, match="model.use_magic"):
        load_checkpoint(folder)
    write({**good, "format_version": 2})
    with pytest.raises(UserError, match="format 2"):
        load_checkpoint(folder)
    write({k: v for k, v in good.items() if k != "format_version"})
    with pytest.raises(UserError, match="format None"):
        load_checkpoint(folder)
    # a config that disagrees with the weights: one line, never a silent partial load
    write({**good, "model": {**good["model"], "embed_dim": 16}})
    with pytest.raises(UserError, match="does not match") as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="not a Duet checkpoint"):
        load_checkpoint(folder)


def test_leftover_tmp_folder_is_not_a_checkpoint(saved, tmp_path):
    complete = copy_of(saved[2], tmp_path)
    newer = os.stat(complete / "model.safetensors").st_mtime + 10
    # as if killed before the rename (write_folder's temporaries, and an earlier version's)
    for name in ("checkpoint-000009.tmp-4242-0", "checkpoint-000009.old-4242-0", "checkpoint-000009.tmp"):
        partial = shutil.copytree(complete, tmp_path / name)
        os.utime(partial / "model.safetensors", (newer, newer))
    assert find_latest_checkpoint(tmp_path) == complete
    newest = copy_of(saved[2], tmp_path / "run")
    for path in newest.rglob("*"):
        os.utime(path, (newer + 20, newer + 20))
    assert find_latest_checkpoint(tmp_path) == newest
    with pytest.raises(UserError, match=str(tmp_path / "nothing")):
        find_latest_checkpoint(tmp_path / "nothing")


def test_failed_save_keeps_the_old_folder(saved, tmp_path, monkeypatch):
    model, _, _ = saved
    folder = save_checkpoint(model, tmp_path / "best_model")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        model.logit_scale.add_(1.0)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint_module, "save_file", crash)
            with pytest.raises(OSError):
                save_checkpoint(model, folder)
        after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert after == before  # the old checkpoint is untouched by a save that failed half-way
        save_checkpoint(model, folder)  # a later save replaces it and cleans up
        assert load_checkpoint(folder).logit_scale.item() == pytest.approx(model.logit_scale.item())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
    finally:
        with torch.no_grad():
            model.logit_scale.sub_(1.0)
