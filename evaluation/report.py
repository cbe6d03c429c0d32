"""The Markdown report of one evaluation: tables rendered from the metrics dict that evaluation/suite.py writes."""
from __future__ import annotations

from pathlib import Path

from evaluation.captions import CAPTION_METRICS
from evaluation.generation import FD_LABEL, GENEVAL_PUBLISHED, GENEVAL_TASKS

ORACLE_KEYS = ("colour", "shape", "size", "position", "relation", "count", "all")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def format_number(value, digits: int = 3) -> str:
    """A metric for a table cell; None (not measured) is a dash."""
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, a line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _retrieval(r: dict) -> list[str]:
    rows = [[label] + [_pct(r[f"{d}_r{k}"]) for k in (1, 5, 10)] + [f"{r[f'{d}_median_rank']:g}"]
            for d, label in (("i2t", "image → text"), ("t2i", "text → image"))]
    return [f"## Retrieval (whole split: {r['num_images']} images, {r['num_captions']} captions)", "",
            *markdown_table(["direction", "R@1", "R@5", "R@10", "median rank"], rows), "",
            "COCO 5k protocol: image → text is a hit when any of the image's captions is ranked there; text → image "
            "ranks the caption's own image. Ties count against the query, so collapsed embeddings score chance.", "",
            *([f"{_pct(r['shared_caption_fraction'])} of the captions also describe another image word for word; "
               "they tie with it, so instance-level recall is ambiguous (and low) on this split.", ""]
              if r.get("shared_caption_fraction") else [])]


def _oracle(title: str, summary: dict, what: str) -> list[str]:
    rows = [["all", *(_pct(summary["overall"].get(k)) for k in ORACLE_KEYS), str(summary["n"])]]
    for key, label in (("single_object", "one object"), ("two_objects", "two objects"),
                       ("held_out", "held-out colour-shape pairs")):
        if key in summary:
            rows.append([label, *(_pct(summary[key].get(k)) for k in ORACLE_KEYS), str(summary[key]["n"])])
    for relation, group in summary["per_relation"].items():
        rows.append([f"relation: {relation}", *(["–"] * 4), _pct(group["relation"]), "–", _pct(group["all"]),
                     str(group["n"])])
    return [f"### {title}", "", *markdown_table(["subset", *ORACLE_KEYS, "n"], rows), "", what, ""]


def _geneval(scores: dict) -> list[str]:
    names = [*GENEVAL_TASKS, "overall"]
    rows = [["Duet (embedded world, oracle)", *(format_number(scores.get(k), 2) for k in names)]]
    rows += [[f"{model} (GenEval, published)", *(["–"] * len(GENEVAL_TASKS)), f"{value:.2f}"]
             for model, value in GENEVAL_PUBLISHED.items()]
    return ["### GenEval-style tasks", "", *markdown_table(["model", *names], rows), "",
            "Each task as GenEval scores it (the object, its count, colour, relative position or colour binding), "
            "read by the embedded world's oracle on our prompts; the published rows are GenEval's own numbers on "
            "natural images, for scale only.", ""]


def _captioning(c: dict) -> list[str]:
    names = [m.replace("_", "-") for m in CAPTION_METRICS]
    lines = ["## Captioning (greedy decoding; official COCO caption scorers)", "",
             *markdown_table(names, [[format_number(c[m]) for m in CAPTION_METRICS]]), ""]
    if c["caption_tokenizer"] == "ptb":
        note = "Tokenized by the PTB tokenizer (Java)."
    else:
        note = "No Java here: tokenized by a simple lowercase/punctuation splitter and METEOR skipped."
    if c["caption_tokenizer"] == "ptb" and c["METEOR"] is None:
        note += " METEOR skipped on request."
    lines += [f"{note} {c['num_captioned_images']} images; captions in `{c['results_file']}` (COCO results format).",
              ""]
    if c.get("oracle"):
        lines += _oracle("Oracle reading of the generated captions", c["oracle"],
                         "parse_caption(generated caption) against each image's true scene.")
    return lines


def _generation(g: dict | None) -> list[str]:
    if g is None:
        return ["## Generation", "", "Skipped (--num-generated 0).", ""]
    rows = [["image-text score: 100 · max(cos, 0), Duet's own encoders (CLIP-score style)",
             format_number(g["image_text_score"], 2)]]
    if "fd_duet_features" in g:
        rows.append([f"{FD_LABEL} ({g['num_generated']} generated vs {g['fd_num_real']} real)",
                     format_number(g["fd_duet_features"], 2)])
    if "fashion_classifier_accuracy" in g:
        rows += [["fashion classifier accuracy on the generated images", _pct(g["fashion_classifier_accuracy"])],
                 ["the same on the real images of those prompts", _pct(g.get("fashion_classifier_accuracy_real"))],
                 ["the classifier's own accuracy on the tinted Fashion-MNIST test split",
                  _pct(g["fashion_classifier_test_accuracy"])]]
    lines = [f"## Generation ({g['num_generated']} images, {g['steps']} {g['scheduler']} steps, guidance "
             f"{g['guidance_scale']:g}, seed {g['seed']})", "", *markdown_table(["metric", "value"], rows), ""]
    if g.get("oracle"):
        lines += _oracle("Oracle reading of the generated images", g["oracle"],
                         "data.oracle.read_image(generated image) against parse_caption(prompt); attributes a prompt "
                         "does not say accept anything.")
        if g["oracle"].get("geneval"):
            lines += _geneval(g["oracle"]["geneval"])
    return lines


def render_report(metrics: dict) -> str:
    """metrics (as in metrics.json) -> the Markdown report."""
    lines = [f"# Evaluation of `{metrics['checkpoint']}`", "",
             f"Dataset `{metrics['dataset']}`, split `{metrics['split']}`"
             + (f" (first {metrics['limit']} images)" if metrics.get("limit") else "")
             + (f"; {metrics['skipped_images']} unreadable image(s) skipped" if metrics.get("skipped_images") else "")
             + f"; torch {metrics['torch_version']} on {metrics['device']}.", ""]
    lines += _retrieval(metrics["retrieval"]) + _captioning(metrics["captioning"]) + _generation(metrics["generation"])
    lines += ["## Figures", ""]
    titles = {"samples": "Generated images (top) and greedy captions of val images (bottom)",
              "retrieval_examples": "Retrieval examples", "loss_curves": "Training loss curves"}
    for key, file_name in metrics["figures"].items():
        lines += [f"**{titles.get(key, key)}**", "", f"![{key}]({file_name})", ""]
    lines += ["## Time", "",
              *markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in metrics["seconds"].items()]), ""]
    return "\n".join(lines)


def write_report(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_report(metrics))
    return path
