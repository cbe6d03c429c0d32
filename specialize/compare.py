"""--mode compare, the validator: base vs fine-tuned (LoRA, full) vs prompt-optimised on the same domain prompts
and seeds. Arms come from what --out holds (manifest.json, summary.json) and --lora/--tuned/--prompt-report;
<out>/compare/ gets compare.json, compare.md (metrics, deltas to the base) and compare_grid.png. Every arm has one
judge, the base's encoders (Duet's own, or --clip-path's CLIP for sd): class accuracy, an image-text score and a
Fréchet distance on image features (not Inception FID)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.files import atomic_write_text
from configs.errors import UserError
from evaluation.fashion_classifier import classifier_accuracy
from evaluation.generation import frechet_distance
from specialize.adapters import Adapter
from specialize.domain import DomainPrompt, domain_classifier, domain_prompts, find_targets, read_targets
from specialize.loading import load_adapter
from specialize.manifest import has_manifest, read_manifest
from specialize.reports import COMPARED, markdown, write_grid, write_json

GEN_BATCH = 25  # images per generation call; seeds are per image, so results do not depend on it
MINIMUMS = {"images_per_prompt": 1, "tints_per_class": 1, "num_prompts": 1}   # specialize/cli.py checks these


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode compare (specialize/cli.py owns --steps, --guidance-scale and --scheduler)."""
    g = parser.add_argument_group("base vs tuned (--mode compare)")
    g.add_argument("--lora", help="a LoRA adapter (its folder or pytorch_lora_weights.safetensors), on the base")
    g.add_argument("--lora-scale", type=float, default=1.0, help="adapter weight for the LoRA arms")
    g.add_argument("--tuned", help="comma-separated --mode finetune folders (their manifest.json) or tuned model "
                                   "folders, besides <out>/finetune (compared whenever it holds a manifest)")
    g.add_argument("--prompt-report", help="--mode prompt's summary.json or folder (default: <out>/prompt when it "
                                           "exists): adds the base model with optimised prompts")
    g.add_argument("--tints-per-class", type=int, default=5, help="fashion prompts per class (one tint each)")
    g.add_argument("--images-per-prompt", type=int, default=2, help="seeds per prompt")
    g.add_argument("--num-prompts", type=int, default=50, help="prompts from the val captions (non-fashion data)")
    g.add_argument("--fd-real-images", type=int, default=500, help="real val images for the Fréchet distance")
    g.add_argument("--grid-rows", type=int, default=10, help="prompts shown in compare_grid.png")


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
    found = [table.get((p.label, p.tint)) or table.get((p.label,)) for p in prompts]
    return [f or p.text for f, p in zip(found, prompts)], [f is not None for f in found]


def tuned_arm(path: str | Path, args) -> tuple[str, dict]:
    """(name, arm) of a fine-tuning folder, whose manifest names the adapter or model and the base, or of a model
    folder, named after it."""
    if not has_manifest(path):
        return Path(path).name, {"kind": "tuned", "path": str(path)}
    m = read_manifest(path)
    if m["backend"] != args.backend:
        raise UserError(f"{path} was fine-tuned with --backend {m['backend']}; compare it with that backend")
    if m["method"] == "lora":
        return "lora", {"kind": "lora", "path": str(m["adapter"]), "scale": args.lora_scale, "base": m["base"]}
    return m["method"], {"kind": "tuned", "path": str(m["model"]), "base": m["base"]}


def resolve_arms(args, folders: dict[str, Path]) -> dict[str, dict]:
    """{arm name: {"kind": base|prompt|lora|tuned, "path": ..., ...}} from what --out holds and the flags."""
    arms: dict[str, dict] = {"base": {"kind": "base"}}
    summary = folders["prompt"] / "summary.json"
    prompt_report = args.prompt_report or (summary if summary.exists() else None)
    if prompt_report:
        arms["prompt_optimised"] = {"kind": "prompt", "path": str(prompt_report)}
    if args.lora:
        arms["lora"] = {"kind": "lora", "path": args.lora, "scale": args.lora_scale}
    tuned = [Path(t.strip()) for t in (args.tuned or "").split(",") if t.strip()]
    if has_manifest(folders["finetune"]) and folders["finetune"].resolve() not in {t.resolve() for t in tuned}:
        tuned.insert(0, folders["finetune"])
    for path in tuned:
        name, arm = tuned_arm(path, args)
        arms[name if name not in arms else f"{name}_{len(arms)}"] = arm
    if len(arms) == 1:
        raise UserError(f"nothing to compare the base with: give --lora, --tuned or --prompt-report (nothing found "
                        f"under {folders['finetune']} or {folders['prompt']})")
    return arms


def load_arm(args, arm: dict, base: str | None) -> Adapter:
    """The base with the arm's adapter fused, or the arm's tuned model; generating only (the base judges)."""
    if arm["kind"] == "lora":
        return load_adapter(args, base, lora=arm["path"], lora_scale=arm["scale"], judge=False)
    return load_adapter(args, arm["path"], judge=False)


def generate(adapter: Adapter, texts: list[str], seeds: list[int], args) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] on the CPU, in GEN_BATCH chunks."""
    return torch.cat([adapter.generate(texts[i:i + GEN_BATCH], seeds[i:i + GEN_BATCH], args.steps,
                                       args.guidance_scale).float().cpu()
                      for i in tqdm(range(0, len(texts), GEN_BATCH), desc="generate", leave=False, file=sys.stderr)])


def arm_metrics(images: torch.Tensor, prompts: list[DomainPrompt], judge: Adapter | None, real_features,
                classifier) -> dict:
    """Metrics of one arm's images against the domain prompts (never against the optimised prompt texts)."""
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


def reconstruction_ceiling(adapter: Adapter, real_images: torch.Tensor, real_labels: list, classifier) -> dict:
    """The classifier on real val images and on their autoencoder round trip: a frozen autoencoder that loses the
    garment caps what any fine-tuning of the denoiser can reach."""
    if classifier is None or any(label is None for label in real_labels) or not len(real_images):
        return {}
    recon = adapter.autoencode(real_images)
    if recon is None:
        return {}
    labels = torch.tensor(real_labels)
    return {"real_images": len(real_images),
            "class_accuracy_real": round(classifier_accuracy(classifier, real_images, labels), 4),
            "class_accuracy_autoencoder_roundtrip": round(classifier_accuracy(classifier, recon, labels), 4),
            "roundtrip_mse": round(float((recon - real_images).pow(2).mean()), 5)}


def deltas(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm's metrics minus the base's."""
    base = arms["base"]["metrics"]
    return {name: {k: round(arm["metrics"][k] - base[k], 4) for k in COMPARED if k in arm["metrics"] and k in base}
            for name, arm in arms.items() if name != "base"}


def run(args, folders: dict[str, Path]) -> dict:
    """Generates every arm's images for the same prompts and seeds, scores them, writes the report."""
    if args.backend == "sdapi":
        raise UserError("--mode compare generates with local weights; --backend sdapi serves --mode prompt")
    started, out_dir = time.time(), folders["compare"]
    arms = resolve_arms(args, folders)
    base_path = (args.checkpoint if args.backend == "duet" else args.model_path) or next(
        (arm["base"] for arm in arms.values() if "base" in arm), None)
    base = load_adapter(args, base_path)
    arms["base"]["path"] = base.source
    targets = read_targets(find_targets(args.dataset, args.data_root, "val"), base.image_size, args.fd_real_images)
    prompts = domain_prompts(args.dataset, targets, args.seed, args.images_per_prompt, args.tints_per_class,
                             args.num_prompts)
    classifier = domain_classifier(args.dataset, args.data_root)
    judge = base if base.aligned else None   # without a CLIP, sd has no aligned space: the classifier alone judges
    real_images = torch.stack([t.image for t in targets])                                # (M, 3, H, W)
    real_features = judge.features(real_images) if judge is not None and len(real_images) >= 2 else None
    real_labels = [t.labels.get("label") for t in targets]
    ceiling = reconstruction_ceiling(base, real_images, real_labels, classifier)
    texts, seeds = [p.text for p in prompts], [p.seed for p in prompts]
    images: dict[str, torch.Tensor] = {}
    for name, arm in arms.items():
        print(f"compare: generating {len(prompts)} images for '{name}'", file=sys.stderr)
        arm_texts = texts
        if arm["kind"] == "prompt":
            arm_texts, covered = optimised_prompts(prompts, read_prompt_report(arm["path"]))
            arm["coverage"] = round(sum(covered) / len(covered), 4)
            arm["prompts"] = sorted(set(t for t, c in zip(arm_texts, covered) if c))
        adapter = base if arm["kind"] in ("base", "prompt") else load_arm(args, arm, base_path)
        images[name] = generate(adapter, arm_texts, seeds, args)
        # without --guidance-scale each arm samples at its own model's default (a tuned model may carry one)
        arm["guidance_scale"] = adapter.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
        arm["metrics"] = arm_metrics(images[name], prompts, judge, real_features, classifier)
        # an arm that trained its decoder has its own ceiling
        own = ceiling if adapter is base else reconstruction_ceiling(adapter, real_images, real_labels, classifier)
        if own:
            arm["metrics"]["roundtrip_class_accuracy"] = own["class_accuracy_autoencoder_roundtrip"]
    report = {
        "backend": base.name, "base": base.source, "dataset": args.dataset,
        "prompts": len(prompts) // args.images_per_prompt, "images_per_prompt": args.images_per_prompt,
        "steps": args.steps or base.sample.steps, "seed": args.seed,
        "guidance_scale": args.guidance_scale,   # None: each arm's own default (arms.*.guidance_scale)
        "scheduler": args.scheduler or base.sample.scheduler,
        "judge": None if judge is None else judge.source, "fd_label": None if judge is None else judge.fd_label,
        "fd_real_images": len(real_images), "classifier_test_accuracy": getattr(classifier, "test_accuracy", None),
        "reconstruction_ceiling": ceiling, "arms": arms, "deltas_vs_base": deltas(arms),
        "minutes": round((time.time() - started) / 60, 2),
    }
    write_json(out_dir / "compare.json", report)
    atomic_write_text(out_dir / "compare.md", markdown(report))
    write_grid(images, prompts, arms, out_dir / "compare_grid.png", args.grid_rows, args.images_per_prompt)
    summary = ", ".join(f"{name} {arm['metrics'].get('class_accuracy', '-')}" for name, arm in arms.items())
    print(f"compare: class accuracy {summary}; report in {out_dir}", file=sys.stderr)
    return report
