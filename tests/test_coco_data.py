"""The COCO-format reader, image cache and dataset factory on a tiny folder of awkward images the test writes."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from configs.errors import UserError
from configs.loading import load_config
from data import cache as cache_module
from data.cache import load_cached_captions
from data.coco import CocoCaptions, resolve_split_files
from data.collate import collate_captions
from data.datasets import build_datasets, caption_token_ids, resolve_dataset_name

SIZE, MAX_LEN = 16, 16
UNICODE_CAPTION = "Ein Café – naïve 日本語 photo"
# file name -> captions; "missing.jpg" is listed but never written, "truncated.jpg" is cut in half.
TRAIN_CAPTIONS = {
    "rgb.jpg": ["a red square on the left", "a red object", UNICODE_CAPTION],
    "truncated.jpg": ["a truncated picture", "a broken image"],
    "gray.png": ["a gray circle", "a small gray shape"],
    "cmyk.jpg": ["a cyan square", "a square in cyan", "cyan", "a cyan object"],
    "palette.png": ["a red image", "a red picture"],
    "missing.jpg": ["a missing image"],
    "rgba.png": ["white on the left and blue on the right", "a blue shape"],
    "la.png": ["a gray shape on white"],
    "nocaption.png": [],
}
BAD = {"truncated.jpg", "missing.jpg"}


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (220, 30, 30)
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=95)
    Image.new("L", (20, 20), 128).save(folder / "gray.png")
    Image.new("CMYK", (24, 20), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)
    palette = Image.new("P", (18, 18), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    palette.save(folder / "palette.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (0, 0, 255, 255)  # left half fully transparent black: must come out white
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    Image.new("LA", (16, 16), (0, 0)).save(folder / "la.png")
    Image.new("RGB", (16, 16)).save(folder / "nocaption.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def _annotations(captions: dict[str, list[str]]) -> dict:
    images, annotations = [], []
    for i, (name, texts) in enumerate(captions.items()):
        images.append({"id": 100 + i, "file_name": name, "width": 16, "height": 16})
        for text in texts:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "caption": text})
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def write_coco_layout(root: Path) -> Path:
    """root/coco2017/{train2017,val2017}/ + annotations/captions_{train,val}2017.json, the official names."""
    folder = root / "coco2017"
    _write_images(folder / "train2017")
    shutil.copytree(folder / "train2017", folder / "val2017")
    (folder / "annotations").mkdir()
    for split in ("train", "val"):
        text = json.dumps(_annotations(TRAIN_CAPTIONS), ensure_ascii=False)
        (folder / "annotations" / f"captions_{split}2017.json").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    return write_coco_layout(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def _dataset(coco_dir, tokenizer, mode="pairs", **kwargs) -> CocoCaptions:
    ann_file, image_dir = resolve_split_files(coco_dir, "train")
    return CocoCaptions(ann_file, image_dir, tokenizer, SIZE, MAX_LEN, caption_mode=mode, **kwargs)


def _by_name(dataset, name: str) -> dict:
    position = dataset.index.file_names.index(name)
    return dataset[int(np.flatnonzero(dataset.index.caption_image == position)[0])]


def test_resolve_split_files_official_and_our_layout(coco_dir, tmp_path):
    assert resolve_split_files(coco_dir, "val") == (coco_dir / "annotations" / "captions_val2017.json",
                                                    coco_dir / "val2017")
    (tmp_path / "val").mkdir()
    (tmp_path / "captions_val.json").write_text("{}")
    assert resolve_split_files(tmp_path, "val") == (tmp_path / "captions_val.json", tmp_path / "val")
    with pytest.raises(UserError, match="captions_train.json"):
        resolve_split_files(tmp_path, "train")
    with pytest.raises(UserError, match="does not exist"):
        resolve_split_files(tmp_path / "nowhere", "train")
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(UserError, match="image folder .*val"):
        resolve_split_files(tmp_path, "val")


def test_pairs_and_random_counts(coco_dir, tokenizer):
    captioned = [name for name, texts in TRAIN_CAPTIONS.items() if texts]
    pairs = _dataset(coco_dir, tokenizer, "pairs")
    assert len(pairs) == sum(len(t) for t in TRAIN_CAPTIONS.values())
    assert pairs.index.file_names == captioned  # annotation order; the caption-less image is left out
    assert len(_dataset(coco_dir, tokenizer, "random")) == len(captioned)
    limited = _dataset(coco_dir, tokenizer, "pairs", limit=2)
    assert limited.index.file_names == captioned[:2]
    assert len(limited) == len(TRAIN_CAPTIONS["rgb.jpg"]) + len(TRAIN_CAPTIONS["truncated.jpg"])


def test_sample_format_and_colour_modes(coco_dir, tokenizer):
    dataset = _dataset(coco_dir, tokenizer)
    sample = _by_name(dataset, "rgb.jpg")
    assert sample["images"].shape == (3, SIZE, SIZE) and sample["images"].dtype == torch.float32
    assert sample["input_ids"].shape == (MAX_LEN,) and sample["input_ids"].dtype == torch.long
    assert sample["attention_mask"].dtype == torch.long and sample["attention_mask"][0] == 1
    assert sample["image_id"] == 100 and sample["caption"] == "a red square on the left"
    assert sample["input_ids"][0] == tokenizer.cls_token_id
    # 40x30 resized to 21x16 then center-cropped: the red half still fills the left columns
    assert sample["images"][0, :, 0].min() > 0.6 and sample["images"][1, :, 0].max() < -0.6
    assert torch.equal(sample["images"][:, :, -1], torch.full((3, SIZE), -1.0))

    unicode = next(dataset[i] for i in range(len(dataset)) if dataset.index.captions[i] == UNICODE_CAPTION)
    assert unicode["caption"] == UNICODE_CAPTION
    gray = _by_name(dataset, "gray.png")["images"]
    assert torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=1e-6)
    cmyk = _by_name(dataset, "cmyk.jpg")["images"].mean(dim=(1, 2))
    assert torch.allclose(cmyk, torch.tensor([-1.0, 1.0, 1.0]), atol=0.05)  # cyan
    palette = _by_name(dataset, "palette.png")["images"].mean(dim=(1, 2))
    assert torch.allclose(palette, torch.tensor([1.0, -1.0, -1.0]))
    rgba = _by_name(dataset, "rgba.png")["images"]
    assert torch.equal(rgba[:, :, 0], torch.ones(3, SIZE))  # transparent -> white
    assert torch.allclose(rgba[:, :, -1].mean(dim=1), torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.equal(_by_name(dataset, "la.png")["images"], torch.ones(3, SIZE, SIZE))


def test_unreadable_images_skipped_and_counted(coco_dir, tokenizer):
    dataset = _dataset(coco_dir, tokenizer)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_captions)
    batches = list(loader)
    kept = sum(len(b["caption"]) for b in batches)
    skipped = sum(b["num_skipped"] for b in batches)
    assert skipped == sum(len(TRAIN_CAPTIONS[name]) for name in BAD)          # pairs mode: once per caption
    assert len({i for b in batches for i in b["skipped_ids"]}) == len(BAD)     # but each image has one id
    assert kept + skipped == len(dataset)
    assert all(b["images"].shape[0] == b["input_ids"].shape[0] == len(b["image_id"]) for b in batches)
    empty = collate_captions([None, None])
    assert empty["num_skipped"] == 2 and empty["images"].shape[0] == 0 and empty["caption"] == []


def test_random_mode_is_seeded_and_changes_per_epoch(coco_dir, tokenizer):
    dataset = _dataset(coco_dir, tokenizer, "random", seed=3)

    def captions_for(epoch):
        dataset.set_epoch(epoch)
        return [s.get("caption") for s in dataset]          # None for an unreadable image

    draws = [captions_for(epoch) for epoch in range(4)]
    assert captions_for(2) == draws[2]
    assert len({tuple(d) for d in draws}) > 1
    for draw in draws:
        for position, caption in enumerate(draw):
            assert caption is None or caption in dataset.image_captions(position)


@pytest.mark.parametrize("mode", ["pairs", "random"])
def test_cache_gives_the_same_samples(coco_dir, tokenizer, tmp_path, mode, monkeypatch):
    uncached = _dataset(coco_dir, tokenizer, mode, seed=1)
    ann_file, image_dir = resolve_split_files(coco_dir, "train")
    if mode == "random":  # also exercise the worker pool
        monkeypatch.setattr(cache_module, "MIN_IMAGES_FOR_POOL", 0)
    cached = load_cached_captions(ann_file, image_dir, tmp_path, "coco", "train", tokenizer, SIZE, MAX_LEN,
                                  caption_mode=mode, seed=1)
    for dataset in (uncached, cached):
        dataset.set_epoch(5)
    expected = [s for s in uncached if "unreadable" not in s]
    actual = list(cached)
    assert len(actual) == len(expected) == len(uncached) - (
        sum(len(TRAIN_CAPTIONS[n]) for n in BAD) if mode == "pairs" else len(BAD))
    for a, b in zip(actual, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
    assert sorted(s["file_name"] for s in cached.skipped) == sorted(BAD)
    assert set(caption_token_ids(cached)) < set(caption_token_ids(uncached))  # the bad images' captions are gone
    assert [p.name for p in tmp_path.iterdir()] == [cached.cache_dir.name]  # no .tmp left behind
    assert cached.cache_dir.name.startswith(f"coco-train-{SIZE}-")


def test_cache_reused_then_rebuilt_when_annotations_change(tmp_path, tokenizer, monkeypatch):
    folder = write_coco_layout(tmp_path / "src")
    ann_file, image_dir = resolve_split_files(folder, "train")
    args = (ann_file, image_dir, tmp_path / "cache", "mine", "train", tokenizer, SIZE, MAX_LEN)
    first = load_cached_captions(*args)
    calls = []
    build = cache_module.build_cache
    monkeypatch.setattr(cache_module, "build_cache", lambda *a, **k: calls.append(1) or build(*a, **k))
    assert len(load_cached_captions(*args)) == len(first) and not calls
    tree = json.loads(ann_file.read_text())
    tree["annotations"] = tree["annotations"][:3]
    ann_file.write_text(json.dumps(tree))
    assert len(load_cached_captions(*args)) == 3 and calls == [1]
    limited = load_cached_captions(*args, limit=1)
    assert limited.cache_dir != first.cache_dir and limited.num_images == 1


def test_malformed_or_missing_annotations_raise_user_error(coco_dir, tokenizer, tmp_path):
    (tmp_path / "train").mkdir()
    ann_file = tmp_path / "captions_train.json"
    ann_file.write_text('{"images": [}')
    with pytest.raises(UserError, match="captions_train.json is not valid JSON"):
        CocoCaptions(ann_file, tmp_path / "train", tokenizer, SIZE, MAX_LEN)
    ann_file.write_text('{"images": []}')
    with pytest.raises(UserError, match="no 'annotations' list"):
        CocoCaptions(ann_file, tmp_path / "train", tokenizer, SIZE, MAX_LEN)
    ann_file.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1}]}')
    with pytest.raises(UserError, match="caption"):
        CocoCaptions(ann_file, tmp_path / "train", tokenizer, SIZE, MAX_LEN)


def _cfg(root: Path, dataset: str, **data):
    overrides = {"data.root": str(root), "data.dataset": dataset, "model.image_size": SIZE,
                 "model.max_caption_len": MAX_LEN, "model.latent_downsample": 4, **data}
    return load_config("tiny", overrides)


def test_build_datasets_from_a_folder_and_coco(coco_dir, tokenizer, tmp_path):
    ours = tmp_path / "mine"
    for split, official in (("train", "train2017"), ("val", "val2017")):
        shutil.copytree(coco_dir / official, ours / split)
        shutil.copy(coco_dir / "annotations" / f"captions_{official}.json", ours / f"captions_{split}.json")
    cfg = _cfg(tmp_path / "root", str(ours), **{"data.caption_mode": "pairs", "data.limit_val": 3})
    assert resolve_dataset_name(cfg) == str(ours)
    train, val = build_datasets(cfg, tokenizer)
    assert train.caption_mode == "pairs" and val.caption_mode == "random"
    assert len(val) == 2  # the first 3 images, less truncated.jpg which the cache left out
    assert train.cache_dir.parent == tmp_path / "root" / "cache"
    batch = collate_captions([train[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, SIZE, SIZE) and batch["num_skipped"] == 0
    ids = caption_token_ids(train)
    assert ids == sorted(set(ids)) and {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                        tokenizer.unk_token_id} <= set(ids)
    assert set(tokenizer("a cyan square")["input_ids"]) <= set(ids)
    assert len(ids) < tokenizer.vocab_size

    # auto: COCO when <root>/coco/coco2017 exists, else the embedded world
    root = tmp_path / "with_coco"
    assert resolve_dataset_name(_cfg(root, "auto")) == "embedded"
    with pytest.raises(UserError, match=r"cocodataset.org.*coco2017"):
        build_datasets(_cfg(root, "coco"), tokenizer)
    shutil.copytree(coco_dir, root / "coco" / "coco2017")
    cfg = _cfg(root, "auto", **{"data.use_cache": False, "data.caption_mode": "random"})
    assert resolve_dataset_name(cfg) == "coco"
    train, val = build_datasets(cfg, tokenizer)
    assert type(train) is CocoCaptions and len(train) == len(TRAIN_CAPTIONS) - 1
    with pytest.raises(UserError, match="neither auto"):
        resolve_dataset_name(_cfg(root, str(tmp_path / "nowhere")))


def test_cache_of_only_unreadable_images_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "captions_train.json").write_text(json.dumps(_annotations({"gone.jpg": ["a lost photo"]})))
    ann_file, image_dir = resolve_split_files(tmp_path / "src", "train")
    with pytest.raises(UserError, match="none of the 1 images"):
        load_cached_captions(ann_file, image_dir, tmp_path / "cache", "src", "train", tokenizer, SIZE, MAX_LEN)
    assert list((tmp_path / "cache").iterdir()) == []
