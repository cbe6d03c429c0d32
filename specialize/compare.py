"""The validator: base vs fine-tuned (LoRA, full) vs prompt-optimised, on the same domain prompts and seeds.

`python specialize.py --mode compare [--checkpoint BASE] [--lora DIR] [--tuned DIR] [--prompt-report JSON]` writes
<out>/compare/: compare.json, compare.md (metrics and their deltas to the base) and compare_grid.png (one row per
class, one column per arm). Metrics: the domain classifier's accuracy (prompt's class vs its prediction), an
image-text score and a Fréchet distance on the judge's image features (not Inception FID), all under one fixed
judge: the base model's own encoders (Duet) or a CLIP model (--clip-path, Stable Diffusion).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.errors import UserError
from specialize.launcher import OUT_SUBDIRS
from specialize.finetune import default_base_checkpoint

GEN_BATCH = 25  # images per generation call; seeds are per image, so results do not depend on it


@dataclass
class DomainPrompt:
    """One generation request: the text, the class it names (None when the domain has none) and its seed."""
    text: str
    seed: int
    label: int | None = None
    label_name: str = ""
    tint: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode compare (the launcher owns --steps, --guidance-scale and --scheduler)."""
    g = parser.add_argument_group("base vs tuned (--mode compare)")
    g.add_argument("--lora", help="LoRA adapter folder (default: <out>/finetune when it holds one)")
    g.add_argument("--lora-scale", type=float, default=1.0, help="adapter weight for the LoRA arm")
    g.add_argument("--tuned", help="comma-separated fully tuned or merged models (default: <out>/finetune/model "
                                   "when it exists)")
    g.add_argument("--prompt-report", help="--mode prompt's summary.json or folder (default: <out>/prompt when it "
                                           "exists): adds the base model with optimised prompts")
    g.add_argument("--tints-per-class", type=int, default=5, help="fashion prompts per class (one tint each)")
    g.add_argument("--images-per-prompt", type=int, default=2, help="seeds per prompt")
    g.add_argument("--num-prompts", type=int, default=50, help="prompts from the val captions (non-fashion data)")
    g.add_argument("--fd-real-images", type=int, default=500, help="real val images for the Fréchet distance")
    g.add_argument("--grid-rows", type=int, default=10, help="prompts shown in compare_grid.png")


# --- what is compared ------------------------------------------------------------------------------------------
def domain_prompts(args, targets) -> list[DomainPrompt]:
    """Fashion: 'a photo of a <tint> <class>' for every class and --tints-per-class tints; otherwise the first
    --num-prompts val captions. Each prompt is repeated over --images-per-prompt seeds."""
    texts: list[tuple[str, int | None, str, str]] = []
    if args.dataset == "fashion":
        from data.fashion import FASHION_CLASSES, FASHION_TINTS, fashion_captions

        tints = list(FASHION_TINTS)[:args.tints_per_class]
        texts = [(fashion_captions(label, tint)[0], label, name, tint)
                 for label, name in enumerate(FASHION_CLASSES) for tint in tints]
    else:
        for target in targets:
            if target.captions:
                texts.append((target.captions[0], target.labels.get("label"), target.labels.get("label_name", ""),
                              target.labels.get("tint", "")))
            if len(texts) == args.num_prompts:
                break
    if not texts:
        raise UserError(f"no prompts for --dataset {args.dataset}: its val split has no captions")
    return [DomainPrompt(text, args.seed + i * args.images_per_prompt + k, label, name, tint)
            for i, (text, label, name, tint) in enumerate(texts) for k in range(args.images_per_prompt)]


def read_prompt_report(path: str | Path) -> dict[tuple, str]:
    """--mode prompt's targets/*.json -> {(label, tint): optimised prompt, (label,): ...} (first target wins)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    files = sorted((folder / "targets").glob("*.json"))
    if not files:
        raise UserError(f"--prompt-report {path}: no targets/*.json beside it; give --mode prompt's summary.json")
    best: dict[tuple, str] = {}
    for file in files:
        try:
            report = json.loads(file.read_text())
            prompt, labels = report["optimized_prompt"], report.get("labels", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{file} is not a --mode prompt target report") from None
        if "label" in labels:
            best.setdefault((labels["label"], labels.get("tint", "")), prompt)
            best.setdefault((labels["label"],), prompt)
    return best


def optimised_prompts(prompts: list[DomainPrompt], table: dict[tuple, str]) -> tuple[list[str], list[bool]]:
    """The optimised prompt of a target of the same class and tint (else class) for each prompt; the plain prompt
    where the report has no such target. Returns (texts, covered)."""
    texts, covered = [], []
    for p in prompts:
        found = table.get((p.label, p.tint)) or table.get((p.label,))
        texts.append(found or p.text)
        covered.append(found is not None)
    return texts, covered


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def resolve_arms(args) -> dict[str, dict]:
    """{arm name: {"kind": base|lora|tuned|prompt, "path": ...}} from the flags and what <out> already holds."""
    from models.lora import LORA_WEIGHT_NAME

    out = Path(args.out)
    arms: dict[str, dict] = {"base": {"kind": "base"}}
    prompt_report = args.prompt_report or _existing(out / OUT_SUBDIRS["prompt"] / "summary.json")
    if prompt_report:
        arms["prompt_optimised"] = {"kind": "prompt", "path": str(prompt_report)}
    finetune_dir = out / OUT_SUBDIRS["finetune"]
    lora = args.lora or (_existing(finetune_dir) if (finetune_dir / LORA_WEIGHT_NAME).is_file() else None)
    if lora:
        arms["lora"] = {"kind": "lora", "path": str(lora), "scale": args.lora_scale}
    tuned = [t for t in (args.tuned or "").split(",") if t.strip()] or \
        [str(p) for p in [_existing(finetune_dir / "model")] if p]
    for path in tuned:
        method = "full" if Path(path).name == "model" else Path(path).name
        name = method if method not in arms else f"tuned_{len(arms)}"
        arms[name] = {"kind": "tuned", "path": path.strip()}
    if len(arms) == 1:
        raise UserError(f"nothing to compare the base with: give --lora, --tuned or --prompt-report (nothing found "
                        f"under {out}/finetune or {out}/prompt)")
    return arms


def base_location(args, arms: dict) -> str | None:
    """--checkpoint, else the base the adapter or the fine-tuning report names, else None (newest under outputs/)."""
    if args.checkpoint:
        return args.checkpoint
    for arm in arms.values():
        if arm["kind"] == "lora":
            info = Path(arm["path"]) / "lora_info.json"
            if info.is_file():
                return json.loads(info.read_text()).get("base")
    report = Path(args.out) / OUT_SUBDIRS["finetune"] / "finetune_report.json"
    return json.loads(report.read_text()).get("base") if report.is_file() else None


# --- models and the judge --------------------------------------------------------------------------------------
def load_arm_model(args, arm: dict, base: str | None, device: torch.device):
    """A Tunable generating for one arm: the base, base + adapter, or a tuned model (a Duet checkpoint or SD folder)."""
    from specialize.tunable import DuetTunable, StableDiffusionTunable

    if args.backend == "sd":
        from specialize.backends import load_sd_pipeline

        path = arm["path"] if arm["kind"] == "tuned" else (base or args.model_path)
        pipe = load_sd_pipeline(path, device)
        if arm["kind"] == "lora":
            from models.lora import lora_file

            file = lora_file(arm["path"])  # diffusers' own pipeline loader, as any SD LoRA user would load it
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="tuned")
            pipe.set_adapters(["tuned"], adapter_weights=[arm["scale"]])
        return StableDiffusionTunable(pipe, path)
    from models.checkpoint import load_checkpoint

    path = arm["path"] if arm["kind"] == "tuned" else (base or str(default_base_checkpoint(Path(args.out))))
    tunable = DuetTunable(load_checkpoint(path, device=device, use_ema=True), path)
    if arm["kind"] == "lora":
        from models.lora import apply_lora

        apply_lora(tunable.model, arm["path"], arm["scale"])
    return tunable


class Judge:
    """Scores images the same way for every arm: features (N, E) for the Fréchet distance and an image-text score."""

    label = ""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class DuetJudge(Judge):
    """The base checkpoint's own encoders (evaluation/generation.py)."""

    def __init__(self, model):
        from evaluation.generation import FD_LABEL

        self.model, self.label = model, FD_LABEL

    def features(self, images):
        from evaluation.generation import image_features

        return image_features(self.model, images)

    def score(self, images, texts):
        from evaluation.generation import image_text_score

        return image_text_score(self.model, images, texts)


class ClipJudge(Judge):
    """A CLIP model for Stable Diffusion: 100 * max(cos, 0), and its image embeddings for the Fréchet distance."""

    label = "FD (CLIP image features) — not Inception FID"

    def __init__(self, backend):
        self.backend = backend

    def features(self, images):
        return torch.cat([self.backend.encode_images(images[i:i + 64]).float().cpu()
                          for i in range(0, len(images), 64)])

    def score(self, images, texts):
        return 100 * (self.features(images) * self.backend.encode_texts(texts).float().cpu()).sum(-1).clamp(min=0)


def load_judge(args, base_tunable, device) -> Judge | None:
    if base_tunable.name == "duet":
        return DuetJudge(base_tunable.model)
    if not getattr(args, "clip_path", None):
        return None  # without a CLIP there is no aligned space for SD: the classifier alone judges
    from specialize.backends import StableDiffusionBackend, load_clip

    clip, processor = load_clip(args.clip_path, device)
    return ClipJudge(StableDiffusionBackend(base_tunable.pipe, clip, processor))


# --- metrics ---------------------------------------------------------------------------------------------------
def generate(tunable, texts: list[str], seeds: list[int], args) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] on the CPU, in GEN_BATCH chunks."""
    from tqdm import tqdm

    images = []
    for start in tqdm(range(0, len(texts), GEN_BATCH), desc="generate", leave=False, file=sys.stderr):
        images.append(tunable.generate(texts[start:start + GEN_BATCH], seeds[start:start + GEN_BATCH],
                                       args.steps, args.guidance_scale, args.scheduler).float().cpu())
    return torch.cat(images)


def arm_metrics(images: torch.Tensor, prompts: list[DomainPrompt], judge: Judge | None, real_features, classifier
                ) -> dict:
    """Metrics of one arm's images against the domain prompts (never against the optimised prompt texts)."""
    from evaluation.generation import frechet_distance

    out: dict = {"num_images": len(images)}
    labels = [p.label for p in prompts]
    if classifier is not None and all(label is not None for label in labels):
        predicted, _ = classifier.classify(images)
        correct = predicted == torch.tensor(labels)
        out["class_accuracy"] = round(float(correct.float().mean()), 4)
        per_class: dict[str, list[bool]] = {}
        for p, ok in zip(prompts, correct.tolist()):
            per_class.setdefault(p.label_name, []).append(ok)
        out["class_accuracy_per_class"] = {k: round(sum(v) / len(v), 3) for k, v in per_class.items()}
        out["predicted"] = predicted.tolist()
    if judge is not None:
        out["image_text_score"] = round(float(judge.score(images, [p.text for p in prompts]).mean()), 4)
        if real_features is not None and len(images) >= 2:
            out["frechet_distance"] = round(frechet_distance(judge.features(images), real_features), 4)
    return out


def reconstruction_ceiling(tunable, real_images: torch.Tensor, real_labels: list, classifier) -> dict:
    """The classifier on real val images and on their autoencoder round trip: a frozen autoencoder that loses the
    garment caps what any fine-tuning of the denoiser can reach."""
    if classifier is None or any(label is None for label in real_labels) or not len(real_images):
        return {}
    from evaluation.fashion_classifier import classifier_accuracy

    labels = torch.tensor(real_labels)
    with torch.no_grad():
        if tunable.name == "duet":
            m = tunable.model
            recon = torch.cat([m.decode_latents(m.encode_latents(real_images[i:i + 64].to(tunable.device))).cpu()
                               for i in range(0, len(real_images), 64)])
        else:
            vae = tunable.vae
            recon = torch.cat([vae.decode(vae.encode(real_images[i:i + 16].to(tunable.device)).latent_dist.mode()
                                          ).sample.clamp(-1, 1).cpu() for i in range(0, len(real_images), 16)])
    return {"real_images": len(real_images),
            "class_accuracy_real": round(classifier_accuracy(classifier, real_images, labels), 4),
            "class_accuracy_autoencoder_roundtrip": round(classifier_accuracy(classifier, recon.float(), labels), 4),
            "roundtrip_mse": round(float((recon.float() - real_images).pow(2).mean()), 5)}


def deltas(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm's metrics minus the base's (the prompt arm also against the base on the prompts it covers)."""
    base = arms["base"]["metrics"]
    keys = ("class_accuracy", "image_text_score", "frechet_distance")
    out = {}
    for name, arm in arms.items():
        if name == "base":
            continue
        m = arm["metrics"]
        out[name] = {k: round(m[k] - base[k], 4) for k in keys if k in m and k in base}
    return out


# --- the mode --------------------------------------------------------------------------------------------------
def run(args) -> dict:
    """--mode compare: generates every arm's images for the same prompts and seeds, scores them, writes the report."""
    from models.checkpoint import quiet_library_progress
    from models.device import resolve_device
    from specialize.compare_report import write_grid, write_markdown
    from specialize.prompt_report import write_json
    from specialize.targets import load_targets

    quiet_library_progress()
    for flag, value in (("--images-per-prompt", args.images_per_prompt), ("--tints-per-class", args.tints_per_class),
                        ("--num-prompts", args.num_prompts)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    started = time.time()
    device = resolve_device(getattr(args, "device", "auto"))
    out_dir = Path(args.out) / OUT_SUBDIRS["compare"]
    arms = resolve_arms(args)
    base = base_location(args, arms)
    base_tunable = load_arm_model(args, arms["base"], base, device)
    arms["base"]["path"] = base_tunable.source
    targets = load_targets(args.dataset, args.data_root, "val", base_tunable.image_size, args.fd_real_images)
    prompts = domain_prompts(args, targets)
    classifier = None
    if args.dataset == "fashion":
        from evaluation.fashion_classifier import load_fashion_classifier

        classifier = load_fashion_classifier(args.data_root)
    judge = load_judge(args, base_tunable, device)
    real_images = torch.stack([t.image for t in targets])                                # (M, 3, H, W)
    real_features = judge.features(real_images) if judge is not None and len(real_images) >= 2 else None
    real_labels = [t.labels.get("label") for t in targets]
    ceiling = reconstruction_ceiling(base_tunable, real_images, real_labels, classifier)
    texts, seeds = [p.text for p in prompts], [p.seed for p in prompts]
    images: dict[str, torch.Tensor] = {}
    for name, arm in arms.items():
        print(f"compare: generating {len(prompts)} images for '{name}'", file=sys.stderr)
        arm_texts = texts
        if arm["kind"] == "prompt":
            arm_texts, covered = optimised_prompts(prompts, read_prompt_report(arm["path"]))
            arm["coverage"] = round(sum(covered) / len(covered), 4)
            arm["prompts"] = sorted(set(t for t, c in zip(arm_texts, covered) if c))
        tunable = base_tunable if arm["kind"] in ("base", "prompt") else load_arm_model(args, arm, base, device)
        images[name] = generate(tunable, arm_texts, seeds, args)
        # without --guidance-scale each arm samples at its own checkpoint's default (a tuned model may carry one)
        arm["guidance_scale"] = tunable.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
        arm["metrics"] = arm_metrics(images[name], prompts, judge, real_features, classifier)
        # An arm that adapted the decoder (--train-decoder) has its own ceiling.
        own = ceiling if tunable is base_tunable else reconstruction_ceiling(tunable, real_images, real_labels,
                                                                             classifier)
        if own:
            arm["metrics"]["roundtrip_class_accuracy"] = own["class_accuracy_autoencoder_roundtrip"]
        if tunable is not base_tunable:
            del tunable
    report = {
        "backend": base_tunable.name, "base": base_tunable.source, "dataset": args.dataset,
        "prompts": len(prompts) // args.images_per_prompt, "images_per_prompt": args.images_per_prompt,
        "steps": args.steps or base_tunable.sample.steps, "seed": args.seed,
        "guidance_scale": args.guidance_scale,   # None: each arm's own default (arms.*.guidance_scale)
        "scheduler": args.scheduler or base_tunable.sample.scheduler,
        "judge": None if judge is None else type(judge).__name__,
        "fd_label": None if judge is None else judge.label, "fd_real_images": len(real_images),
        "classifier_test_accuracy": getattr(classifier, "test_accuracy", None),
        "reconstruction_ceiling": ceiling,
        "arms": arms,
        "deltas_vs_base": deltas(arms),
        "minutes": round((time.time() - started) / 60, 2),
    }
    write_json(out_dir / "compare.json", report)
    write_markdown(report, out_dir / "compare.md")
    write_grid(images, prompts, arms, out_dir / "compare_grid.png", args.grid_rows, args.images_per_prompt)
    summary = ", ".join(f"{name} {arm['metrics'].get('class_accuracy', '-')}" for name, arm in arms.items())
    print(f"compare: class accuracy {summary}; report in {out_dir}", file=sys.stderr)
    return report
