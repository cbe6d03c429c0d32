"""Text-to-image metrics on (prompt, image) pairs: a CLIP-score-style image-text score with Duet's own encoders,
a Fréchet distance on Duet image-encoder features, and the embedded world's oracle accuracies (also for captions).

FD here is NOT Inception FID (Heusel et al.), whose Inception weights cannot be had offline; it is the same
formula on the unnormalised embeddings of our own image encoder, so it only compares models that share that
encoder (e.g. a checkpoint against its fine-tune), never against published FIDs.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from data.oracle import compare, parse_caption, read_image, summarize
from evaluation.fashion_classifier import classifier_accuracy
from common.images import to_pil

FD_LABEL = "FD (Duet encoder features) — not Inception FID, whose weights cannot be had offline"


@torch.no_grad()
def image_features(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] -> image-encoder embeds before normalisation (N, E), float32 on the CPU."""
    device = model.logit_scale.device
    feats = [model.encode_image(images[i:i + batch_size].to(device), normalize=False).float().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, model.config.model.embed_dim)


@torch.no_grad()
def embed_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Tokenized texts (N, T) -> normalised text embeds (N, E) on the CPU, in the input order.

    Batches go shortest first and are cut to their longest text: pad tokens are masked out of attention and
    pooling, so this changes nothing but the time (world captions average 13 of 24 tokens)."""
    device = model.logit_scale.device
    lengths = attention_mask.sum(1)
    order = lengths.argsort(stable=True)
    embeds = torch.zeros(len(input_ids), model.config.model.embed_dim)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(int(lengths[rows].max()), 1)
        embeds[rows] = model.encode_text(input_ids[rows, :width].to(device),
                                         attention_mask[rows, :width].to(device)).float().cpu()
    return embeds


def text_embeddings(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """texts -> normalised text embeds (N, E) on the CPU."""
    if not texts:
        return torch.zeros(0, model.config.model.embed_dim)
    tokens = model.tokenize(texts)
    return embed_tokens(model, tokens["input_ids"].cpu(), tokens["attention_mask"].cpu(), batch_size)


def image_text_score(model, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """CLIP-score style (Hessel et al., without their 2.5 weight): 100 * max(cos, 0) between each image (N, 3, H, W)
    and its text under the model's own encoders -> (N,). Only meaningful once the encoders are aligned."""
    assert len(images) == len(texts), "one text per image"
    return score_features(image_features(model, images), text_embeddings(model, texts))


def score_features(features: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Image features (N, D), any scale, and normalised text embeds (N, D) -> 100 * max(cos, 0) per pair (N,)."""
    return 100 * (F.normalize(features, dim=-1) * text_embeds).sum(-1).clamp(min=0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features (N_a, D) and (N_b, D):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2), in float64.

    tr((C_a C_b)^1/2) is the sum of square roots of the eigenvalues of C_a^1/2 C_b C_a^1/2, which is symmetric PSD,
    so eigh suffices (no scipy sqrtm and its complex round-off). Needs >= 2 samples per set; with fewer samples
    than dimensions the covariances are singular, which is fine but biases FD upwards: compare equal-sized sets.
    """
    a, b = feats_a.double(), feats_b.double()
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1] and len(a) >= 2 and len(b) >= 2
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.t()
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(fd.clamp(min=0))


def _relation_name(scene) -> str:
    return scene.relation or ("none" if len(scene.objects) < 2 else "unsaid")


# GenEval (Ghosh et al. 2023) task -> (which prompts, what must be right), on the embedded world's oracle.
GENEVAL_TASKS = {
    "single_object": (1, ("shape", "count")),
    "two_objects": (2, ("shape", "count")),
    "counting": (None, ("count",)),
    "colors": (1, ("shape", "colour")),
    "position": (2, ("shape", "relation")),
    "color_attr": (2, ("shape", "colour")),
}
GENEVAL_PUBLISHED = {"SD v1.5": 0.43, "best public model (about)": 0.88}


def geneval_scores(results: list[dict], truths: list) -> dict:
    """GenEval's six tasks scored on our prompts: an image counts for a task when the oracle finds what that task
    checks (e.g. colour attribution: both objects with their own colours). "overall" is their mean, as in GenEval.
    Our prompts also say size and place, which GenEval's do not, so these are lenient next to the "all" column."""
    out = {}
    for task, (objects, keys) in GENEVAL_TASKS.items():
        chosen = [r for r, t in zip(results, truths) if objects is None or len(t.objects) == objects]
        out[task] = float(sum(all(r[k] for k in keys) for r in chosen) / len(chosen)) if chosen else None
    present = [v for v in out.values() if v is not None]
    out["overall"] = float(sum(present) / len(present)) if present else None
    return out


def oracle_summary(predicted: list, truths: list) -> dict:
    """Scenes read from outputs vs the scenes they should show -> accuracies from data.oracle.compare:
    {"overall": {colour, shape, size, position, relation, count, all}, "per_relation": {left_of: {relation, all,
    n}, ..., none: ...}, "held_out": {... over truths holding a held-out colour-shape pair, "n"}, "single_object"
    and "two_objects": {... over one- and two-object truths, "n"}, "geneval": geneval_scores, "n"}."""
    assert len(predicted) == len(truths)
    results = [compare(p, t) for p, t in zip(predicted, truths)]
    by_relation = defaultdict(list)
    for result, truth in zip(results, truths):
        by_relation[_relation_name(truth)].append(result)
    held_out = [r for r, t in zip(results, truths) if t.has_held_out()]
    by_count = {n: [r for r, t in zip(results, truths) if len(t.objects) == n] for n in (1, 2)}
    per_relation = {}
    for name, group in sorted(by_relation.items()):
        summary = summarize(group)
        per_relation[name] = {"relation": summary["relation"], "all": summary["all"], "n": len(group)}
    return {
        "overall": summarize(results),
        "per_relation": per_relation,
        "held_out": {**summarize(held_out), "n": len(held_out)},
        "single_object": {**summarize(by_count[1]), "n": len(by_count[1])},
        "two_objects": {**summarize(by_count[2]), "n": len(by_count[2])},
        "geneval": geneval_scores(results, truths),
        "n": len(results),
    }


def oracle_generation_accuracy(images: torch.Tensor, prompts: list[str]) -> dict:
    """Generated images (N, 3, H, W) in [-1, 1] read by the embedded world's oracle vs parse_caption(prompt) (what
    the prompt says; unsaid attributes accept anything) -> oracle_summary's dict. Images must be >= 16 px."""
    return oracle_summary([read_image(im) for im in to_pil(images)], [parse_caption(p) for p in prompts])


def oracle_caption_accuracy(captions: list[str], scenes: list) -> dict:
    """Generated captions parsed by data.oracle.parse_caption vs each image's true Scene -> oracle_summary's dict."""
    return oracle_summary([parse_caption(c) for c in captions], list(scenes))


def generated_image_metrics(model, prompts: list[str], images: torch.Tensor, real_features: torch.Tensor | None = None,
                            dataset: str = "", labels: list[int] | None = None, classifier=None) -> dict:
    """The metrics of generated images (N, 3, H, W) for their prompts; what evaluate.py and the fine-tuning
    validator report. Always image_text_score; fd_duet_features when real_features (M, E) (image_features of real
    images) are given; on "embedded" the oracle accuracies; with labels (N,) and a fashion classifier, its accuracy.
    """
    assert len(images) == len(prompts), "one prompt per image"
    features = image_features(model, images)
    out: dict = {"num_generated": len(images),
                 "image_text_score": float(score_features(features, text_embeddings(model, prompts)).mean())}
    if real_features is not None and len(images) >= 2 and len(real_features) >= 2:
        out["fd_duet_features"] = frechet_distance(features, real_features)
        out["fd_label"] = FD_LABEL
        out["fd_num_real"] = len(real_features)
    if dataset == "embedded":
        out["oracle"] = oracle_generation_accuracy(images, prompts)
    if labels is not None and classifier is not None:
        out["fashion_classifier_accuracy"] = classifier_accuracy(classifier, images, torch.as_tensor(labels))
        out["fashion_classifier_test_accuracy"] = classifier.test_accuracy
    return out
