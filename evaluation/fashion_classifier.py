"""A small Fashion-MNIST CNN that scores generated fashion images: trained once on the real train split, kept as
safetensors under <data.root>/cache/fashion_classifier/, retrained when missing.

It reads tinted RGB images of any size: the input is resized to the fashion set's 32x32, unpadded to the original
28x28, and reduced to its brightest channel over that channel's maximum, which undoes a multiplicative tint. It is
still trained on randomly tinted copies, so that path (and impure generated colours) is what it learns from.
FashionAgreement scores a generated image against a target: its class and its tint (estimate_tints).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.files import atomic_write
from configs.errors import UserError
from data.fashion import FASHION_DIR, FASHION_TINTS, read_idx

CLASSIFIER_VERSION = "2"        # bump when the architecture or preprocessing changes: cached weights retrain
CACHE_SUBDIR = Path("cache") / "fashion_classifier"
WEIGHTS_NAME = "classifier.safetensors"
NUM_CLASSES = 10
NATIVE_SIZE, PADDED_SIZE = 28, 32  # Fashion-MNIST's side, and data/fashion.py's (padded with 2 black pixels)
TEST_SEED = 1
BRIGHT = 0.15   # pixels darker than this (in [0, 1]) are background and carry no tint


def conv_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]


class FashionClassifier(nn.Module):
    """Three 3x3 conv+BN blocks and an MLP: images (B, 3, H, W) in [-1, 1] -> logits (B, 10) over
    data.fashion.FASHION_CLASSES. ~2.3M multiply-adds per image: 2 epochs, 91% (a 5x5 LeNet: 88% at 0.8x the time)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, width), nn.MaxPool2d(2),                         # (B, w, 14, 14)
            *conv_block(width, 2 * width), nn.MaxPool2d(2),                 # (B, 2w, 7, 7)
            *conv_block(2 * width, 4 * width))                              # (B, 4w, 7, 7)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 7 * 7, 128), nn.ReLU(),
                                  nn.Linear(128, NUM_CLASSES))
        self.test_accuracy: float | None = None  # on the tinted Fashion-MNIST test split, set when trained/loaded

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> tint-normalised grey (B, 1, 28, 28) in [-1, 1]."""
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (PADDED_SIZE, PADDED_SIZE):
            x = F.interpolate(x, size=(PADDED_SIZE, PADDED_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        pad = (PADDED_SIZE - NATIVE_SIZE) // 2
        grey = x[:, :, pad:pad + NATIVE_SIZE, pad:pad + NATIVE_SIZE].amax(dim=1, keepdim=True)  # (B, 1, 28, 28)
        # Tinting multiplies each channel by a constant; dividing by the peak undoes it (the floor keeps a blank
        # image blank instead of amplifying its noise).
        grey = grey / grey.amax(dim=(2, 3), keepdim=True).clamp(min=0.1)
        return grey * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.preprocess(images)))

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> (labels (B,) long, probabilities (B, 10))."""
        was_training = self.training
        self.eval()
        probs = torch.cat([F.softmax(self(images[i:i + batch_size]), dim=-1)
                           for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, NUM_CLASSES)
        self.train(was_training)
        return probs.argmax(dim=-1), probs


def tinted_images(grey: np.ndarray | torch.Tensor, rng: torch.Generator, random_share: float = 0.5) -> torch.Tensor:
    """grey (N, 28, 28) uint8 -> (N, 3, 32, 32) in [-1, 1], each tinted like data/fashion.py does: the grey levels
    times one colour, padded with black. A random_share of the colours are random RGB, the rest the named tints."""
    grey = torch.as_tensor(grey).float() / 255                                            # (N, 28, 28)
    named = torch.tensor(list(FASHION_TINTS.values()), dtype=torch.float32) / 255          # (T, 3)
    colours = named[torch.randint(len(named), (len(grey),), generator=rng)]                 # (N, 3)
    random_colours = torch.rand(len(grey), 3, generator=rng) * 0.8 + 0.2
    pick_random = torch.rand(len(grey), 1, generator=rng) < random_share
    colours = torch.where(pick_random, random_colours, colours)
    images = grey[:, None] * colours[:, :, None, None]                                     # (N, 3, 28, 28)
    pad = (PADDED_SIZE - NATIVE_SIZE) // 2
    return F.pad(images, (pad, pad, pad, pad)) * 2 - 1


def read_fashion_split(split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST "train" or "test" from the system copy -> (grey (N, 28, 28) uint8, labels (N,) uint8)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [FASHION_DIR / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    if not all(p.is_file() for p in paths):
        raise UserError(f"Fashion-MNIST not found under {FASHION_DIR}; install it with: "
                        "apt-get install dataset-fashion-mnist")
    grey, labels = (read_idx(p) for p in paths)  # read-only views of the decompressed bytes
    if limit:
        grey, labels = grey[:limit], labels[:limit]
    return grey.copy(), labels.copy()


def classifier_accuracy(classifier: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (N, 3, H, W) whose predicted class equals labels (N,)."""
    if len(images) == 0:
        return float("nan")
    predicted, _ = classifier.classify(images)
    return float((predicted == torch.as_tensor(labels).long()).float().mean())


def fashion_test_accuracy(classifier: FashionClassifier, limit: int = 0) -> float:
    """Accuracy on the (first `limit` of the) Fashion-MNIST test split, tinted with the named tints (seeded)."""
    grey, labels = read_fashion_split("test", limit)
    images = tinted_images(grey, torch.Generator().manual_seed(TEST_SEED), random_share=0.0)
    return classifier_accuracy(classifier, images, torch.from_numpy(labels.astype(np.int64)))


def train_fashion_classifier(epochs: int = 2, batch_size: int = 128, learning_rate: float = 2e-3, limit: int = 0,
                             seed: int = 0, max_steps: int = 0) -> FashionClassifier:
    """Trains on freshly tinted (and randomly mirrored) copies of the train split each step; one-cycle LR.
    Runs on one torch thread (restored after): with two, these small convolutions burnt 5x the CPU time here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, batch_size, learning_rate, limit, seed, max_steps)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, batch_size: int, learning_rate: float, limit: int, seed: int, max_steps: int
           ) -> FashionClassifier:
    grey, labels = read_fashion_split("train", limit)
    grey, labels = torch.from_numpy(grey), torch.from_numpy(labels.astype(np.int64))
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier = FashionClassifier()
    steps_per_epoch = max(1, len(grey) // batch_size)
    total = min(max_steps, epochs * steps_per_epoch) if max_steps else epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=total, pct_start=0.15)
    classifier.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(grey), generator=rng)
        rows = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        images = tinted_images(grey[rows], rng)
        mirror = torch.rand(len(rows), generator=rng) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
        loss = F.cross_entropy(classifier(images), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval()


def classifier_path(root: str | Path) -> Path:
    return Path(root) / CACHE_SUBDIR / WEIGHTS_NAME


def save_fashion_classifier(classifier: FashionClassifier, root: str | Path) -> Path:
    """Writes the weights (and test accuracy, as metadata) atomically to <root>/cache/fashion_classifier/."""
    metadata = {"version": CLASSIFIER_VERSION, "test_accuracy": repr(classifier.test_accuracy)}
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    return atomic_write(classifier_path(root), lambda tmp: save_file(state, tmp, metadata=metadata))


def _read_cached(path: Path) -> FashionClassifier | None:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("version") != CLASSIFIER_VERSION:
            return None
        classifier = FashionClassifier()
        classifier.load_state_dict(load_file(path))
    except (OSError, SafetensorError, RuntimeError):  # missing, truncated or from another architecture
        return None
    accuracy = metadata.get("test_accuracy", "None")
    classifier.test_accuracy = None if accuracy == "None" else float(accuracy)
    return classifier.eval()


def load_fashion_classifier(root: str | Path, train_if_missing: bool = True, verbose: bool = True) -> FashionClassifier:
    """The cached classifier under <root>/cache/fashion_classifier/, trained (about a minute of one core), tested on
    the tinted test split and cached first when missing or stale. `.test_accuracy` holds that test accuracy."""
    path = classifier_path(root)
    classifier = _read_cached(path)
    if classifier is not None:
        return classifier
    if not train_if_missing:
        raise UserError(f"no fashion classifier at {path}; run evaluate.py on the fashion set once to train it")
    if verbose:
        print(f"training the Fashion-MNIST classifier (cached at {path})", flush=True)
    start = time.time()
    classifier = train_fashion_classifier()
    classifier.test_accuracy = fashion_test_accuracy(classifier)
    save_fashion_classifier(classifier, root)
    if verbose:
        print(f"fashion classifier: test accuracy {classifier.test_accuracy:.2%} after {time.time() - start:.0f} s",
              flush=True)
    return classifier


def estimate_tints(images: torch.Tensor, tints: dict[str, tuple[int, int, int]]) -> list[str]:
    """(B, 3, H, W) in [-1, 1] -> the named tint whose RGB direction is closest to each image's brightness-weighted
    mean colour (the fashion set multiplies grey levels by one colour, so that direction is the tint's)."""
    x = (images.detach().float().cpu() + 1) / 2                                     # (B, 3, H, W)
    weight = x.amax(dim=1, keepdim=True)                                            # (B, 1, H, W)
    weight = torch.where(weight > BRIGHT, weight ** 2, torch.zeros_like(weight))
    colour = (x * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp(min=1e-6)  # (B, 3)
    names = list(tints)
    directions = F.normalize(torch.tensor([tints[n] for n in names], dtype=torch.float32), dim=-1)   # (T, 3)
    nearest = (F.normalize(colour, dim=-1) @ directions.t()).argmax(dim=-1)
    return [names[i] for i in nearest.tolist()]


class FashionAgreement:
    """agreement(images, target) -> mean over images of class match and (when the target has a tint) tint match;
    a target has `.image` (3, H, W) and `.labels` (label, tint when known). `parts` of the last call keeps the two
    shares apart for the reports."""

    def __init__(self, classifier: FashionClassifier):
        self.classifier = classifier.eval()
        self.tints = FASHION_TINTS
        self.parts: dict[str, float] = {}

    def target_label(self, target) -> int:
        if "label" in target.labels:
            return int(target.labels["label"])
        return int(self.classifier.classify(target.image[None])[0][0])

    def agreement(self, images: torch.Tensor, target) -> float:
        predicted, _ = self.classifier.classify(images.detach().float().cpu())
        self.parts = {"class": float((predicted == self.target_label(target)).float().mean())}
        tint = target.labels.get("tint") or estimate_tints(target.image[None], self.tints)[0]
        if tint in self.tints:
            self.parts["tint"] = sum(t == tint for t in estimate_tints(images, self.tints)) / len(images)
        return round(sum(self.parts.values()) / len(self.parts), 6)
