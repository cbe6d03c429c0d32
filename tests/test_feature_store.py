"""The diffusion phase's feature store: the disk backend holds what the memory one computes, is written once per
frozen weights and dataset, and is read back instead of recomputed."""
import json

import numpy as np
import pytest
import torch

from configs.loading import load_config
from data.datasets import build_datasets, caption_token_ids
from models.duet import DuetModel
from models.text_encoder import load_text_backbone
from training import feature_store
from training.feature_store import features_key, load_features

NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


@pytest.fixture(scope="module")
def world(tiny_bert, tmp_path_factory):
    """(model, train set, data root) on the tiny preset."""
    root = tmp_path_factory.mktemp("data")
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "data.root": str(root)})
    bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
    train, _ = build_datasets(cfg, tokenizer)
    cfg.model.caption_vocab_size = len(caption_token_ids(train))
    torch.manual_seed(0)
    return DuetModel(cfg, bert, tokenizer), train, root


def test_disk_holds_what_memory_computes_and_is_read_back(world, tmp_path, monkeypatch):
    model, train, _ = world
    memory, how = load_features("memory", tmp_path, model, train, 2, torch.device("cpu"), NO_AUTOCAST)
    assert how == "computed"
    disk, how = load_features("disk", tmp_path, model, train, 2, torch.device("cpu"), NO_AUTOCAST)
    folder = tmp_path / "cache" / "features" / features_key(model, train, 2)
    assert how == f"computed and written to {folder}"
    assert [p.name for p in folder.parent.iterdir() if not p.name.startswith(".")] == [folder.name]  # no temporaries
    assert json.loads((folder / "manifest.json").read_text())["captions"] == len(memory)
    for name in ("latents", "tokens", "readable", "hidden", "mask", "image"):
        assert isinstance(getattr(disk, name), np.memmap), name
        assert torch.equal(torch.from_numpy(np.asarray(getattr(disk, name))), getattr(memory, name)), name
    rows = torch.tensor([5, 0, 5, 3])
    for name in ("latents", "hidden", "mask"):
        assert torch.equal(disk.take(name, rows), memory.take(name, rows)), name

    def no_second_encoding(*args, **kwargs):
        raise AssertionError("the store recomputed features it holds")

    monkeypatch.setattr(feature_store, "build_frozen_features", no_second_encoding)
    again, how = load_features("disk", tmp_path, model, train, 2, torch.device("cpu"), NO_AUTOCAST)
    assert how == f"read from {folder}" and torch.equal(torch.from_numpy(np.asarray(again.latents)), memory.latents)


def test_the_key_follows_the_frozen_weights_and_the_data(world):
    model, train, _ = world
    key = features_key(model, train, 2)
    assert features_key(model, train, 2) == key and features_key(model, train, 1) != key
    weight = model.text_encoder.bert.embeddings.word_embeddings.weight
    kept = weight[5, 0].item()
    with torch.no_grad():
        weight[5, 0] += 1
        assert features_key(model, train, 2) != key
        weight[5, 0] = kept
        model.diffusion.unet.conv_in.weight.add_(1)           # trains in the phase: not part of the key
    assert features_key(model, train, 2) == key
    train.input_ids = train.input_ids.copy()
    train.input_ids[0, 1] += 1
    assert features_key(model, train, 2) != key


def test_auto_keeps_the_features_in_memory_while_they_fit(world, tmp_path, monkeypatch):
    model, train, _ = world
    features, _ = load_features("memory", tmp_path, model, train, 0, torch.device("cpu"), NO_AUTOCAST)
    estimate = feature_store.estimated_bytes(model, train, 0)
    assert features.nbytes <= estimate <= 1.1 * features.nbytes      # masks are stored at their longest caption
    assert load_features("auto", tmp_path, model, train, 0, torch.device("cpu"), NO_AUTOCAST)[1] == "computed"
    monkeypatch.setattr(feature_store, "RAM_SHARE", 0.0)               # a dataset larger than this machine's RAM
    assert "written to" in load_features("auto", tmp_path, model, train, 0, torch.device("cpu"), NO_AUTOCAST)[1]
