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
