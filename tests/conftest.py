"""Shared test setup: offline, one intra-op thread, a tiny BERT written to disk, the tiny embedded world."""
import os
import string
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny ops gain nothing from intra-op threads; pytest -n 2 uses both cores instead.
torch.set_num_threads(1)

# Whole words the embedded world and the fashion set use, so tiny-BERT token sequences stay short.
_WORDS = """a an the of to on in at and is with there photo picture image small large big tiny huge left right top
bottom center middle above below next side upper lower corner red green blue yellow purple orange cyan white black
gray grey pink brown near over under circle square triangle diamond star cross ring shape object objects one two t-shirt top trouser
trousers pullover dress coat sandal shirt sneaker bag ankle boot boots garment clothing item""".split()


def write_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT and its WordPiece tokenizer, saved like a hub model (odd sizes catch swapped dims)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = list(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + _WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


TINTS = {"red": (235, 45, 40), "green": (60, 200, 70), "blue": (60, 110, 245), "yellow": (245, 220, 50)}
GARMENTS = ("dress", "bag")


def write_caption_set(folder: Path, count: int = 16, size: int = 16) -> Path:
    """A COCO-format split pair of tinted blocks ("a photo of a red dress"), labelled like the fashion set: a tiny
    domain to fine-tune on."""
    import json

    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            label, tint = i % 2, list(TINTS)[i % 4]
            pixels = np.zeros((size, size, 3), np.uint8)
            rows = slice(size // 8, size - size // 8) if label == 0 else slice(size * 3 // 8, size * 3 // 4)
            pixels[rows, size // 4:size * 3 // 4] = TINTS[tint]    # a tall "dress", a short "bag"
            Image.fromarray(pixels).save(folder / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "label": label, "label_name": GARMENTS[label],
                           "tint": tint})
            annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"a photo of a {tint} {GARMENTS[label]}"})
        (folder / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_bert, tmp_path_factory) -> Path:
    """A random tiny-preset Duet checkpoint at <tmp>/run/best_model, seeded."""
    from configs.loading import load_config
    from models.checkpoint import save_checkpoint
    from models.duet import DuetModel

    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert)})
    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(cfg), tmp_path_factory.mktemp("tiny_checkpoint") / "run" / "best_model")
