"""The base-vs-tuned validator (specialize/compare.py) on tiny models: arms from fine-tuning's manifests, a complete
report, and bad input."""
import json

import pytest
import torch
from PIL import Image

from specialize.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert) -> dict:
    """A tiny base checkpoint, a 20-image fashion set, an untrained (cached) classifier, a LoRA and a full fine-tune."""
    from configs.loading import load_config
    from data.fashion import ensure_fashion
    from evaluation.fashion_classifier import FashionClassifier, save_fashion_classifier
    from models.checkpoint import save_checkpoint
    from models.duet import DuetModel

    tmp = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    base = save_checkpoint(DuetModel.build(load_config("tiny", {"model.text_encoder": str(tiny_bert)})), tmp / "base")
    ensure_fashion(tmp / "data", 20, 20)
    torch.manual_seed(0)
    save_fashion_classifier(FashionClassifier(), tmp / "data")  # cached, so compare does not train one
    common = ["--checkpoint", str(base), "--data-root", str(tmp / "data"), "--batch-size", "4", "--max-steps", "2",
              "--lr", "1e-2", "--device", "cpu"]
    assert main(["--mode", "finetune", "--out", str(tmp / "run"), "--method", "lora", "--rank", "4", *common]) == 0
    assert main(["--mode", "finetune", "--out", str(tmp / "full"), "--full", *common]) == 0
    # A --mode prompt report with one target: class 3 (dress) in red.
    targets = tmp / "run" / "prompt" / "targets"
    targets.mkdir(parents=True)
    (targets / "1.json").write_text(json.dumps({"labels": {"label": 3, "label_name": "dress", "tint": "red"},
                                                "optimized_prompt": "a red dress, photo"}))
    (tmp / "run" / "prompt" / "summary.json").write_text("{}")
    return {"tmp": tmp, "base": base, "data": tmp / "data"}


def test_compare_writes_a_complete_report(setup):
    tmp = setup["tmp"]
    # the LoRA arm comes from <out>/finetune's manifest, the full one from another fine-tune's (--tuned)
    assert main(["--mode", "compare", "--data-root", str(setup["data"]), "--out", str(tmp / "run"),
                 "--tuned", str(tmp / "full" / "finetune"), "--steps", "2", "--tints-per-class", "1",
                 "--images-per-prompt", "2", "--fd-real-images", "8", "--grid-rows", "4", "--device", "cpu"]) == 0
    out = tmp / "run" / "compare"
    report = json.loads((out / "compare.json").read_text())
    assert report["base"] == str(setup["base"])  # found through the manifests
    assert set(report["arms"]) == {"base", "prompt_optimised", "lora", "full"}
    for arm in report["arms"].values():
        m = arm["metrics"]
        assert m["num_images"] == 20 and 0 <= m["class_accuracy"] <= 1
        assert len(m["class_accuracy_per_class"]) == 10
        assert m["image_text_score"] >= 0 and m["frechet_distance"] >= 0
    assert report["arms"]["prompt_optimised"]["coverage"] == pytest.approx(0.1)  # the dress prompts only
    assert set(report["deltas_vs_base"]) == {"prompt_optimised", "lora", "full"}
    assert "not Inception FID" in report["fd_label"]
    assert set(report["reconstruction_ceiling"]) >= {"class_accuracy_real", "class_accuracy_autoencoder_roundtrip"}
    assert all(0 <= arm["metrics"]["roundtrip_class_accuracy"] <= 1 for arm in report["arms"].values())
    # Same prompts and seeds: the base and the prompt arm differ only where the report had a prompt.
    base_pred, prompt_pred = (report["arms"][a]["metrics"]["predicted"] for a in ("base", "prompt_optimised"))
    assert [b for i, b in enumerate(base_pred) if i // 2 != 3] == [p for i, p in enumerate(prompt_pred) if i // 2 != 3]
    table = (out / "compare.md").read_text()
    assert all(f"| {arm}" in table for arm in ("base", "lora", "full")) and "not Inception FID" in table
    with Image.open(out / "compare_grid.png") as grid:
        assert grid.width > 4 * 96 and grid.height > 4 * 96


def test_compare_without_anything_to_compare_is_one_line_exit_2(setup, tmp_path, capsys):
    assert main(["--mode", "compare", "--checkpoint", str(setup["base"]), "--data-root", str(setup["data"]),
                 "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing to compare")
