"""Caption metrics with the official COCO caption scorers (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The scorers are called directly rather than through COCOEvalCap.evaluate(), whose SPICE step downloads Stanford
models. METEOR and the PTB tokenizer are Java programs; without `java` captions are tokenized by a simple
lowercase/punctuation splitter and METEOR is skipped (said once on stderr, and recorded in the metrics).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

CAPTION_METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_warned_no_java = False


def java_available() -> bool:
    return shutil.which("java") is not None


def _say_no_java_once() -> None:
    global _warned_no_java
    if not _warned_no_java:
        _warned_no_java = True
        print("note: `java` not found: captions are tokenized by a simple lowercase/punctuation splitter instead of "
              "the PTB tokenizer and METEOR is skipped (install a JRE, e.g. apt-get install default-jre-headless, "
              "for the official scores)", file=sys.stderr)


def simple_tokenize(caption: str) -> str:
    """Lowercase words and numbers with punctuation dropped, joined by spaces: the PTB tokenizer's output, roughly."""
    return " ".join(_WORD.findall(caption.lower()))


def tokenize(captions_by_image: dict[int, list[str]], use_java: bool) -> dict[int, list[str]]:
    """{image_id: [caption, ...]} -> the same with each caption tokenized (PTB with Java, else simple_tokenize)."""
    if not use_java:
        return {k: [simple_tokenize(c) for c in v] for k, v in captions_by_image.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions_by_image.items()})


def write_results_json(path: str | Path, image_ids: list[int], captions: list[str]) -> Path:
    """Writes the COCO caption results format: [{"image_id": int, "caption": str}, ...]."""
    assert len(image_ids) == len(captions)
    path = Path(path)
    path.write_text(json.dumps([{"image_id": int(i), "caption": c} for i, c in zip(image_ids, captions)], indent=1))
    return path


def read_results_json(path: str | Path) -> dict[int, str]:
    """COCO caption results JSON -> {image_id: caption}; one caption per image, as the COCO server requires."""
    results = {}
    for entry in json.loads(Path(path).read_text()):
        image_id = int(entry["image_id"])
        assert image_id not in results, f"image {image_id} has two captions in {path}"
        results[image_id] = entry["caption"]
    return results


def score_captions(results: dict[int, str], references: dict[int, list[str]], use_meteor: bool = True) -> dict:
    """{image_id: generated caption}, {image_id: [reference captions]} -> corpus-level CAPTION_METRICS.

    Every result must have references. METEOR is None when skipped (no Java, or use_meteor=False); the dict also
    says which tokenizer ran ("caption_tokenizer": "ptb" | "simple") and how many images were scored.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [i for i in results if i not in references]
    assert not missing, f"no reference captions for image ids {missing[:5]}"
    use_java = java_available()
    if not use_java:
        _say_no_java_once()
    ids = sorted(results)
    gts = tokenize({i: list(references[i]) for i in ids}, use_java)
    res = tokenize({i: [results[i]] for i in ids}, use_java)
    scores: dict[str, float | None] = dict.fromkeys(CAPTION_METRICS)
    if ids:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)})
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        # CIDEr's idf comes from the references of this very set: one image alone scores 0 by construction.
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if use_java and use_meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    return {**scores, "caption_tokenizer": "ptb" if use_java else "simple", "num_captioned_images": len(ids)}
