"""The evaluation of one checkpoint on one split: full-split retrieval, captions scored with the COCO scorers,
generated-image metrics; writes metrics.json, report.md, the COCO results JSON and PNG figures."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.figures import loss_curve_png, sample_sheet_png
from common.images import to_pil
from configs.errors import UserError
from data.coco import resolve_split_files
from data.collate import collate_captions
from data.datasets import build_split, dataset_folder, refuse_inside_dataset, resolve_dataset_name, skipped_at_build
from data.world import Scene
from evaluation.captions import read_results_json, score_captions, write_results_json
from evaluation.fashion_classifier import classifier_accuracy, load_fashion_classifier
from evaluation.generation import embed_tokens, generated_image_metrics, oracle_caption_accuracy
from evaluation.report import write_report
from evaluation.retrieval import retrieval_metrics, top_matches
from evaluation.retrieval_examples import retrieval_examples_png
from models.device import resolve_device
from models.checkpoint import load_checkpoint, resolve_checkpoint

NUM_FIGURE_SAMPLES = 8      # images in the sample grid
NUM_RETRIEVAL_QUERIES = 4   # queries per direction in the retrieval figure
RESULTS_FILE = "captions_results.json"


class Stopwatch:
    """Seconds per named stage, printed as each stage ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 2)
        self._start = now
        print(f"{name}: {note} ({self.seconds[name]:.1f} s)", flush=True)


def image_entries(folder: Path, split: str) -> dict[int, dict]:
    """The split's COCO image entries by id (the embedded world's carry "scene", fashion's "label")."""
    ann_file, _ = resolve_split_files(folder, split)
    return {int(entry["id"]): entry for entry in json.loads(ann_file.read_text())["images"]}


def caption_one_thread(model, images: torch.Tensor) -> list[str]:
    """model.caption on one CPU thread: greedy decoding is a chain of tiny ops (B x 1 token) that gain nothing
    from a second thread, and on a busy 2-core box two threads made it 25x slower (1.6 s vs 39 s, 200 images)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model.caption(images)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def encode_images(model, data, batch_size: int, num_workers: int) -> dict:
    """One pass over the split's images (data in "random" caption mode: one sample per image): raw features for
    FD, normalised embeds for retrieval, greedy captions. Unreadable images are left out.

    Returns {"positions": (N,) long into the split, "image_ids": (N,) long, "image_features": (N, E),
    "image_embeds": (N, E), "captions": N generated str, "references": N lists of the split's captions}.
    """
    device = model.logit_scale.device
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_captions)
    image_ids, features, captions = [], [], []
    for batch in loader:
        if len(batch["images"]) == 0:
            continue
        images = batch["images"].to(device)
        features.append(model.encode_image(images, normalize=False).float().cpu())
        captions += caption_one_thread(model, images)
        image_ids.append(batch["image_id"])
    image_ids = torch.cat(image_ids) if image_ids else torch.zeros(0, dtype=torch.long)
    features = torch.cat(features) if features else torch.zeros(0, model.config.model.embed_dim)
    position_of = {int(i): p for p, i in enumerate(data.index.image_ids)}
    positions = torch.tensor([position_of[int(i)] for i in image_ids], dtype=torch.long)
    return {"positions": positions, "image_ids": image_ids, "image_features": features,
            "image_embeds": torch.nn.functional.normalize(features, dim=-1), "captions": captions,
            "references": [data.image_captions(int(p)) for p in positions]}


def encode_captions(model, data, positions: torch.Tensor, batch_size: int) -> dict:
    """The split's captions of the images at `positions` -> {"text_embeds": (N_cap, E), "caption_image": (N_cap,)
    long index into positions, "caption_texts": N_cap str}; tokens come from the dataset, tokenized once."""
    keep = np.zeros(data.num_images, dtype=bool)
    keep[positions.numpy()] = True
    rows = np.flatnonzero(keep[data.index.caption_image])                 # captions of the kept images
    assert np.all(np.diff(positions.numpy()) > 0), "images must come in split order"
    new_position = np.cumsum(keep) - 1
    text_embeds = embed_tokens(model, torch.from_numpy(data.input_ids[rows].astype(np.int64)),
                               torch.from_numpy(data.attention_mask[rows].astype(np.int64)), batch_size)
    return {"text_embeds": text_embeds, "caption_texts": [data.index.captions[r] for r in rows],
            "caption_image": torch.from_numpy(new_position[data.index.caption_image[rows]]).long()}


def shared_caption_fraction(captions: list[str], caption_image: torch.Tensor) -> float:
    """Fraction of captions whose exact text also describes another image (fashion: "a red dress" for ~1 in 50):
    those tie with the other image and count against it, so instance retrieval is ambiguous there."""
    images_of: dict[str, set[int]] = {}
    for text, image in zip(captions, caption_image.tolist()):
        images_of.setdefault(text.strip().lower(), set()).add(image)
    shared = sum(len(images_of[text.strip().lower()]) > 1 for text in captions)
    return shared / max(len(captions), 1)


def _load_images(data, positions: list[int]) -> torch.Tensor:
    """Images (K, 3, H, W) at these positions of a "random"-mode split (all known to be readable)."""
    return torch.stack([data[p]["images"] for p in positions])


def _retrieval_figure(data, encoded: dict, out_path: Path) -> Path:
    n = min(NUM_RETRIEVAL_QUERIES, len(encoded["positions"]))
    caption_image = encoded["caption_image"]
    # The first caption of each of the first n images queries the images, and those images query the captions.
    query_rows = [int(torch.nonzero(caption_image == i)[0]) for i in range(n)]
    top_images = top_matches(encoded["text_embeds"][query_rows], encoded["image_embeds"], 5)
    text_queries = []
    for row, tops in zip(query_rows, top_images.tolist()):
        pictures = to_pil(_load_images(data, encoded["positions"][tops].tolist()))
        text_queries.append((encoded["caption_texts"][row], pictures, [t == int(caption_image[row]) for t in tops]))
    top_texts = top_matches(encoded["image_embeds"][:n], encoded["text_embeds"], 3)
    query_images = to_pil(_load_images(data, encoded["positions"][:n].tolist()))
    image_queries = [(image, [encoded["caption_texts"][t] for t in tops], [int(caption_image[t]) == i for t in tops])
                     for i, (image, tops) in enumerate(zip(query_images, top_texts.tolist()))]
    return retrieval_examples_png(text_queries, image_queries, out_path)


def caption_metrics(encoded: dict, name: str, entries: dict[int, dict], out_dir: Path, use_meteor: bool) -> dict:
    """Writes the greedy captions as a COCO results JSON and scores that file against the split's references;
    on the embedded world, also the oracle's reading of the captions against each image's true scene."""
    image_ids = encoded["image_ids"].tolist()
    results_path = write_results_json(out_dir / RESULTS_FILE, image_ids, encoded["captions"])
    scores = score_captions(read_results_json(results_path), dict(zip(image_ids, encoded["references"])),
                            use_meteor=use_meteor)
    scores["results_file"] = RESULTS_FILE
    if name == "embedded":
        scenes = [Scene.from_dict(entries[i]["scene"]) for i in image_ids]
        scores["oracle"] = oracle_caption_accuracy(encoded["captions"], scenes)
    return scores


def generation_metrics(model, data, encoded: dict, generated: torch.Tensor, prompts: list[str], name: str,
                       entries: dict[int, dict], data_root: str) -> dict:
    """generated_image_metrics against the whole split's features; on the fashion set also the classifier's
    accuracy on the real images of the same prompts (its ceiling here)."""
    labels, classifier = None, None
    if name == "fashion":
        classifier = load_fashion_classifier(data_root)
        labels = [int(entries[int(i)]["label"]) for i in encoded["image_ids"][:len(prompts)]]
    out = generated_image_metrics(model, prompts, generated, encoded["image_features"], name, labels, classifier)
    if classifier is not None:
        real = _load_images(data, encoded["positions"][:len(prompts)].tolist())
        out["fashion_classifier_accuracy_real"] = classifier_accuracy(classifier, real, torch.tensor(labels))
    return out


def write_figures(data, encoded: dict, generated: torch.Tensor, prompts: list[str], metrics_log: Path,
                  out_dir: Path) -> dict[str, str]:
    """samples.png, retrieval_examples.png and (when the run's metrics.jsonl is there) loss_curves.png."""
    shown = min(NUM_FIGURE_SAMPLES, len(encoded["positions"]))
    real = _load_images(data, encoded["positions"][:shown].tolist())
    figures = {"samples": sample_sheet_png(to_pil(generated[:shown]), prompts[:shown], to_pil(real),
                                           encoded["captions"][:shown], out_dir / "samples.png").name,
               "retrieval_examples": _retrieval_figure(data, encoded, out_dir / "retrieval_examples.png").name}
    if metrics_log.is_file():
        figures["loss_curves"] = loss_curve_png(metrics_log, out_dir / "loss_curves.png").name
    return figures


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An earlier evaluation's report is never replaced silently: it may be another split's or limit's."""
    if not overwrite and (out_dir / "metrics.json").exists():
        raise UserError(f"{out_dir} already holds an evaluation (metrics.json); pass --overwrite to replace it "
                        f"or choose another --out")


def skipped_images(data, encoded: dict) -> int:
    """Unreadable images of the split, each counted once where it was found: left out when the cache was built, or
    read as None by the uncached reader (one sample per image in random mode, so never counted twice)."""
    return skipped_at_build(data) + data.num_images - len(encoded["positions"])


def evaluate_checkpoint(checkpoint: str | Path | None = None, dataset: str | None = None, split: str | None = None,
                        limit: int = 0, out_dir: str | Path | None = None, num_generated: int = 64,
                        steps: int | None = None, guidance_scale: float | None = None, scheduler: str | None = None,
                        batch_size: int = 64, seed: int = 0,
                        device: str = "auto", data_root: str | None = None, use_meteor: bool = True,
                        overwrite: bool = False) -> dict:
    """Evaluates a checkpoint (default: the newest under outputs/) on a split of its own dataset (or `dataset`) and
    writes metrics.json, report.md, captions_results.json and the figures into out_dir (default <checkpoint>/eval).
    Returns the metrics dict. limit: first N images of the split (0: all). steps, guidance_scale, scheduler: None
    takes the checkpoint's sample section. An out_dir holding a report is replaced only with overwrite."""
    for name, value in (("--limit", limit), ("--num-generated", num_generated), ("--seed", seed)):
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if (steps is not None and steps < 1) or batch_size < 1:
        raise UserError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    watch = Stopwatch()
    if out_dir:
        check_out_dir(Path(out_dir), overwrite)  # before anything loads: a refusal costs nothing
    checkpoint = resolve_checkpoint(checkpoint or None)
    out_dir = Path(out_dir) if out_dir else checkpoint / "eval"
    check_out_dir(out_dir, overwrite)
    model = load_checkpoint(checkpoint, resolve_device(device), use_ema=True)
    sample = model.config.sample
    steps, scheduler = steps or sample.steps, scheduler or sample.scheduler
    guidance_scale = sample.guidance_scale if guidance_scale is None else guidance_scale
    model.sampler(scheduler)  # an unknown name fails before any work
    cfg = copy.deepcopy(model.config)
    if dataset:
        cfg.data.dataset = dataset
    if data_root:
        cfg.data.root = data_root
    name = resolve_dataset_name(cfg)
    folder = dataset_folder(cfg, name)
    refuse_inside_dataset(out_dir, folder, "the evaluation folder", "choose another with --out")
    split = split or cfg.data.val_split
    data = build_split(cfg, name, folder, split, model.tokenizer, limit, "random")
    out_dir.mkdir(parents=True, exist_ok=True)
    watch.lap("load", f"{checkpoint} on {name}/{split}: {data.num_images} images, {data.num_captions} captions")

    num_workers = 0 if cfg.data.use_cache else min(cfg.train.num_workers, os.cpu_count() or 1)
    encoded = encode_images(model, data, batch_size, num_workers)
    if len(encoded["positions"]) < 2:
        raise UserError(f"{name}/{split} has fewer than 2 readable images; nothing to evaluate")
    skipped = skipped_images(data, encoded)
    watch.lap("images", f"{len(encoded['positions'])} images embedded and captioned"
                        + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    encoded.update(encode_captions(model, data, encoded["positions"], 4 * batch_size))
    watch.lap("texts", f"{len(encoded['text_embeds'])} captions embedded")
    metrics: dict = {"checkpoint": str(checkpoint), "dataset": name, "split": split, "limit": limit,
                     "skipped_images": skipped, "torch_version": torch.__version__,
                     "device": str(model.logit_scale.device)}
    metrics["retrieval"] = retrieval_metrics(encoded["image_embeds"], encoded["text_embeds"], encoded["caption_image"])
    metrics["retrieval"]["shared_caption_fraction"] = shared_caption_fraction(encoded["caption_texts"],
                                                                              encoded["caption_image"])
    watch.lap("retrieval", f"i2t R@1 {metrics['retrieval']['i2t_r1']:.3f}, t2i R@1 {metrics['retrieval']['t2i_r1']:.3f}")

    entries = image_entries(folder, split) if name in ("embedded", "fashion") else {}
    metrics["captioning"] = caption_metrics(encoded, name, entries, out_dir, use_meteor)
    watch.lap("captioning", f"BLEU-4 {metrics['captioning']['BLEU_4']:.3f}, "
                            f"CIDEr {metrics['captioning']['CIDEr']:.3f}")

    count = min(num_generated, len(encoded["image_ids"]))
    # Image k's first caption is prompt k: real images for the sample grid and the classifier line up.
    prompts = [encoded["references"][k][0] for k in range(count)]
    generated = model.generate_images(prompts, [seed + i for i in range(count)], steps, guidance_scale, scheduler,
                                      batch_size=batch_size)
    metrics["generation"] = None
    if count:
        g = generation_metrics(model, data, encoded, generated, prompts, name, entries, cfg.data.root)
        metrics["generation"] = {**g, "steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler,
                                 "seed": seed}
        fd = g.get("fd_duet_features", float("nan"))
        watch.lap("generation", f"{count} images, {steps} {scheduler} steps, image-text score "
                                f"{g['image_text_score']:.1f}, FD (Duet features) {fd:.2f}")

    metrics["figures"] = write_figures(data, encoded, generated, prompts, checkpoint.parent / "metrics.jsonl", out_dir)
    watch.lap("figures", ", ".join(metrics["figures"].values()))
    metrics["seconds"] = watch.seconds
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(metrics, out_dir / "report.md")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.md'}", flush=True)
    return metrics
