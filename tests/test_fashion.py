"""The Fashion-MNIST wrapper: tinted COCO-format set whose captions and labels match the source files."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from transformers import AutoTokenizer

from configs.errors import UserError
from configs.loading import load_config
from data.datasets import build_datasets, resolve_dataset_name
from data.fashion import (FASHION_CLASSES, FASHION_DIR, FASHION_TINTS, complete_fashion_sets, ensure_fashion,
                          fashion_folder, read_idx)

pytestmark = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
TRAIN, VAL = 60, 12


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    return ensure_fashion(tmp_path_factory.mktemp("root"), TRAIN, VAL)


def test_captions_name_class_and_tint_and_labels_match(fashion_dir):
    for split, prefix, count in (("train", "train", TRAIN), ("val", "t10k", VAL)):
        coco = COCO(str(fashion_dir / f"captions_{split}.json"))
        labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", count)
        gray = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", count)
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        for i, img in enumerate(coco.loadImgs(coco.getImgIds())):
            assert img["label"] == labels[i] and img["label_name"] == FASHION_CLASSES[labels[i]]
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
            assert len(captions) == 5 and all(img["label_name"] in c for c in captions)
            assert sum(img["tint"] in c for c in captions) >= 3
            assert not any(t in c for c in captions for t in FASHION_TINTS if t != img["tint"])
            pixels = np.asarray(Image.open(fashion_dir / split / img["file_name"]))
            assert pixels.shape == (32, 32, 3) and not pixels[:2].any()  # black padding
            # the tint times the original grey levels
            expected = (gray[i].astype(np.uint32)[..., None] * FASHION_TINTS[img["tint"]] + 127) // 255
            assert np.array_equal(pixels[2:30, 2:30], expected)
    tints = {img["tint"] for img in json.loads((fashion_dir / "captions_train.json").read_text())["images"]}
    assert tints == set(FASHION_TINTS)


def test_deterministic_and_regenerated_only_when_asked(fashion_dir, tmp_path):
    stamp = (fashion_dir / "captions_train.json").stat().st_mtime_ns
    assert fashion_dir == fashion_folder(fashion_dir.parent, TRAIN, VAL)
    assert ensure_fashion(fashion_dir.parent, TRAIN, VAL) == fashion_dir
    assert (fashion_dir / "captions_train.json").stat().st_mtime_ns == stamp
    other = ensure_fashion(tmp_path, TRAIN, VAL)
    assert (other / "captions_val.json").read_bytes() == (fashion_dir / "captions_val.json").read_bytes()
    assert (other / "train" / "00007.png").read_bytes() == (fashion_dir / "train" / "00007.png").read_bytes()
    smaller = ensure_fashion(tmp_path, 10, 5, ["red", "blue"])
    tree = json.loads((smaller / "captions_train.json").read_text())
    assert len(tree["images"]) == 10 and {i["tint"] for i in tree["images"]} <= {"red", "blue"}
    assert sorted(p.name for p in (smaller / "train").iterdir()) == [f"{i:05d}.png" for i in range(10)]
    assert smaller != other and (other / "captions_train.json").is_file()  # the first set is left as it was
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([other.name, smaller.name, f".{other.name}.lock", f".{smaller.name}.lock"])  # no temps
    assert set(complete_fashion_sets(tmp_path)) == {smaller, other}


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        ensure_fashion(tmp_path, 5, 5, source_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match="fashion_tints"):
        ensure_fashion(tmp_path, 5, 5, ["mauve"])
    with pytest.raises(UserError, match="fashion_val_images"):
        ensure_fashion(tmp_path, 5, 10001)


def test_build_datasets_fashion(tmp_path, tiny_bert):
    cfg = load_config("tiny", {"data.dataset": "fashion", "data.root": str(tmp_path), "data.fashion_train_images": 20,
                               "data.fashion_val_images": 8, "data.caption_mode": "pairs"})
    assert resolve_dataset_name(cfg) == "fashion"
    train, val = build_datasets(cfg, AutoTokenizer.from_pretrained(tiny_bert))
    assert (len(train), len(val)) == (100, 8)
    folder = fashion_folder(tmp_path, 20, 8, cfg.data.fashion_tints)
    entries = {i["id"]: i for i in json.loads((folder / "captions_train.json").read_text())["images"]}
    sample = train[7]
    assert entries[sample["image_id"]]["label_name"] in sample["caption"]
    assert sample["images"].shape == (3, cfg.model.image_size, cfg.model.image_size)
    assert sample["images"].min() == -1.0  # black background
