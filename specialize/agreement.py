"""Domain agreement for fashion targets: does a generated image show the target's garment class (the Fashion-MNIST
classifier, evaluation/fashion_classifier.py) and its tint (the nearest named tint of its bright pixels)?"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("duet.specialize.prompt")
BRIGHT = 0.15   # pixels darker than this (in [0, 1]) are background and carry no tint


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
    `parts` of the last call keeps the two shares apart for the reports."""

    def __init__(self, classifier):
        from data.fashion import FASHION_TINTS

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


def load_agreement(data_root, backend=None) -> FashionAgreement | None:
    """The fashion agreement scorer (the classifier is trained and cached under <data_root>/cache/ on first use),
    or None when this checkout has no evaluation/fashion_classifier.py."""
    try:
        from evaluation.fashion_classifier import load_fashion_classifier
    except ImportError:
        logger.warning("evaluation/fashion_classifier.py is missing: scoring by image similarity alone")
        return None
    classifier = load_fashion_classifier(data_root)
    accuracy = getattr(classifier, "test_accuracy", None)
    if accuracy is not None:
        logger.info("fashion classifier: %.1f%% test accuracy", 100 * accuracy)
    return FashionAgreement(classifier)
