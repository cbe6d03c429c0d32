"""Evaluation metrics on hand-made cases with known answers, and evaluate.py end to end on a tiny checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from configs.errors import UserError
from configs.loading import load_config
from data.embedded import ensure_embedded, read_split
from data.fashion import FASHION_TINTS
from evaluation.captions import read_results_json, score_captions, simple_tokenize, write_results_json
from evaluation.fashion_classifier import (FashionClassifier, classifier_accuracy, fashion_test_accuracy,
                                           load_fashion_classifier, read_fashion_split, save_fashion_classifier,
                                           tinted_images, train_fashion_classifier)
from evaluation.generation import (embed_tokens, frechet_distance, generated_image_metrics, oracle_caption_accuracy,
                                   oracle_generation_accuracy)
from evaluation.retrieval import image_to_text_ranks, retrieval_metrics, text_to_image_ranks
from evaluation.suite import shared_caption_fraction
from models.checkpoint import save_checkpoint
from models.duet import DuetModel


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_identical_embeddings_give_perfect_recall():
    embeds = _unit(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)))
    m = retrieval_metrics(embeds, embeds.clone(), torch.arange(50))
    assert m["i2t_r1"] == m["t2i_r1"] == 1.0
    assert m["i2t_median_rank"] == m["t2i_median_rank"] == 1.0


def test_shuffled_pairing_scores_about_chance():
    n = 400
    embeds = _unit(torch.randn(n, 32, generator=torch.Generator().manual_seed(0)))
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    m = retrieval_metrics(embeds, embeds.clone(), shuffled)  # caption i belongs to a random other image
    for direction in ("i2t", "t2i"):
        assert m[f"{direction}_r10"] < 0.08                  # chance: 10 / 400 = 0.025
        assert n / 4 < m[f"{direction}_median_rank"] < 3 * n / 4


def test_multi_caption_protocol_on_a_hand_made_case():
    # Captions are one-hot, so image i's score for caption j is images[i, j]; images own two captions each.
    images = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0],    # own 0,1: best own (0.9) is first -> rank 0
                           [0.9, 0.8, 0.7, 0.1, 0.0, 0.0],    # own 2,3: 0.9 and 0.8 beat 0.7 -> rank 2
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]])   # own 4,5: 0.6 is first -> rank 0
    captions, caption_image = torch.eye(6), torch.tensor([0, 0, 1, 1, 2, 2])
    assert image_to_text_ranks(images, captions, caption_image).tolist() == [0, 2, 0]
    # Caption j ranks its own image in column j: e.g. caption 0 scores (0.1, 0.9, 0.5) -> its image 0 is third.
    assert text_to_image_ranks(images, captions, caption_image).tolist() == [2, 0, 0, 2, 1, 0]
    m = retrieval_metrics(images, captions, caption_image)
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r5"] == 1.0 and m["i2t_median_rank"] == 1.0
    assert m["t2i_r1"] == pytest.approx(3 / 6) and m["t2i_median_rank"] == 1.0  # floor(median(0,0,0,1,2,2)) + 1


def test_ties_count_against_the_query_and_shared_captions_are_counted():
    constant = _unit(torch.ones(10, 4))                       # a collapsed encoder
    m = retrieval_metrics(constant, constant.clone(), torch.arange(10))
    assert m["i2t_r1"] == m["t2i_r1"] == 0.0
    # The same words for two images tie in any text encoder: the report flags such splits.
    texts = ["a red dress", "A red dress", "a blue bag", "a blue bag"]
    assert shared_caption_fraction(texts, torch.tensor([0, 1, 2, 2])) == 0.5


REFERENCES = {1: ["a large red circle on the left", "a big red circle at the left"],
              2: ["a small blue square above a large green cross"],
              3: ["there is a tiny yellow diamond in the center"],
              4: ["two purple triangles at the bottom"]}


def test_a_caption_scored_against_itself(tmp_path):
    results = {i: refs[0] for i, refs in REFERENCES.items()}
    path = write_results_json(tmp_path / "results.json", list(results), list(results.values()))
    assert read_results_json(path) == results
    same = score_captions(read_results_json(path), REFERENCES)
    assert same["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE_L"] == pytest.approx(1.0)
    assert same["CIDEr"] > 3.0
    if same["caption_tokenizer"] == "ptb":
        assert same["METEOR"] == pytest.approx(1.0, abs=1e-3)
    wrong = score_captions({i: "a photo of something" for i in REFERENCES}, REFERENCES, use_meteor=False)
    assert wrong["BLEU_4"] < 0.01 and wrong["CIDEr"] < 0.5 and wrong["METEOR"] is None


def test_without_java_the_simple_tokenizer_runs_and_meteor_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr("evaluation.captions.java_available", lambda: False)
    monkeypatch.setattr("evaluation.captions._warned_no_java", False)
    scores = score_captions({i: refs[0].upper() + "." for i, refs in REFERENCES.items()}, REFERENCES)
    assert scores["caption_tokenizer"] == "simple" and scores["METEOR"] is None
    assert scores["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert "java" in capsys.readouterr().err
    assert simple_tokenize("A red, BIG circle's edge!") == "a red big circle's edge"


def test_frechet_distance_of_a_set_with_itself_and_of_moved_sets():
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 8)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(8.0, rel=1e-6)   # |shift|^2, same covariance
    # b = 2a: |mu_a|^2 + tr(C + 4C - 2 * 2C) = |mu_a|^2 + tr(C), exactly.
    expected = float(feats.double().mean(0).pow(2).sum() + torch.cov(feats.double().t()).trace())
    assert frechet_distance(feats, 2 * feats) == pytest.approx(expected, rel=1e-6)


def test_embedding_length_sorted_trimmed_batches_matches_one_padded_batch(tiny_bert):
    torch.manual_seed(0)
    model = DuetModel.build(load_config("tiny", {"model.text_encoder": str(tiny_bert)})).eval()
    texts = ["a red circle", "a large blue square above a small green cross on the left", "two", "a tiny cyan ring",
             "a big white diamond in the middle of the picture", "a star"]
    tokens = model.tokenize(texts)
    with torch.no_grad():
        expected = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(embed_tokens(model, tokens["input_ids"], tokens["attention_mask"], batch_size=4), expected,
                          atol=1e-5)


def _load_images(records: list[dict]) -> torch.Tensor:
    arrays = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in records])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def world_val(tmp_path_factory) -> list[dict]:
    return read_split(ensure_embedded(tmp_path_factory.mktemp("world"), 1, 24, seed=0, workers=1), "val")


def test_oracle_scores_real_val_images_and_their_captions_near_100_percent(world_val):
    images, prompts = _load_images(world_val), [r["captions"][0] for r in world_val]
    real = oracle_generation_accuracy(images, prompts)
    assert real["n"] == 24 and real["overall"]["all"] >= 0.95 and real["held_out"]["n"] > 0
    assert sum(g["n"] for g in real["per_relation"].values()) == 24
    mismatched = oracle_generation_accuracy(images, prompts[1:] + prompts[:1])
    assert mismatched["overall"]["all"] < 0.5
    captions = oracle_caption_accuracy([r["captions"][1] for r in world_val], [r["scene"] for r in world_val])
    assert captions["overall"]["all"] >= 0.95


def _tiny_checkpoint(folder: Path, tiny_bert: Path, data_root: Path) -> Path:
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "data.root": str(data_root),
                               "data.embedded_train_images": 4, "data.embedded_val_images": 10,
                               "data.fashion_train_images": 4, "data.fashion_val_images": 6})
    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(cfg), folder)


def test_evaluate_writes_metrics_report_and_figures(tmp_path, tiny_bert, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "run" / "best_model", tiny_bert, tmp_path / "data")
    log = [{"step": s, "epoch": 0, "lr": 1e-3, "loss": 3.0 / s, "cont": 2.0 / s, "rec": 0.5, "diff": 0.9,
            "i2t": 0.1, "t2i": 0.1} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.7, "val_i2t": 0.2}]
    (checkpoint.parent / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in log))
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoint", str(checkpoint), "--out", str(out), "--num-generated", "4", "--steps", "2",
                          "--no-meteor", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "embedded" and metrics["retrieval"]["num_images"] == 10
    assert metrics["retrieval"]["num_captions"] == 50
    assert len(json.loads((out / "captions_results.json").read_text())) == 10
    assert metrics["captioning"]["oracle"]["n"] == 10 and metrics["generation"]["oracle"]["n"] == 4
    assert "fd_duet_features" in metrics["generation"]
    report = (out / "report.md").read_text()
    assert "| image → text |" in report and "BLEU-4" in report and "not Inception FID" in report
    for name in ("samples.png", "retrieval_examples.png", "loss_curves.png"):
        assert f"]({name})" in report
        assert Image.open(out / name).size[0] > 100


def test_evaluate_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_fashion_classifier_preprocessing_undoes_a_tint():
    grey, _ = read_fashion_split("test", limit=16)
    pad = 2
    grey_t = torch.from_numpy(grey.copy()).float() / 255
    tinted = {name: torch.nn.functional.pad(grey_t[:, None] * torch.tensor(rgb).view(1, 3, 1, 1) / 255,
                                            (pad, pad, pad, pad)) * 2 - 1 for name, rgb in FASHION_TINTS.items()}
    reference = FashionClassifier.preprocess(tinted["white"])
    for images in tinted.values():
        assert torch.allclose(FashionClassifier.preprocess(images), reference, atol=0.02)
    # Any input size is read at 32x32 (the fashion set's), e.g. a 64x64 generated image.
    upscaled = torch.nn.functional.interpolate(tinted["red"], size=64, mode="nearest")
    assert FashionClassifier.preprocess(upscaled).shape == (16, 1, 28, 28)


def test_fashion_classifier_trains_scores_saves_and_loads(tmp_path, tiny_bert):
    classifier = train_fashion_classifier(limit=2048, batch_size=64, max_steps=40, seed=0)
    accuracy = fashion_test_accuracy(classifier, limit=400)
    assert accuracy > 0.6                                     # chance 0.1; 40 steps gave 0.77, the full run 91%
    predicted, probs = classifier.classify(tinted_images(read_fashion_split("test", 8)[0], torch.Generator()))
    assert predicted.shape == (8,) and torch.allclose(probs.sum(-1), torch.ones(8))
    images = tinted_images(read_fashion_split("test", 64)[0], torch.Generator().manual_seed(0))
    labels = classifier.classify(images)[0]
    assert classifier_accuracy(classifier, images, labels) == 1.0
    assert classifier_accuracy(classifier, images, (labels + 1) % 10) == 0.0

    with pytest.raises(UserError):
        load_fashion_classifier(tmp_path, train_if_missing=False)
    classifier.test_accuracy = accuracy
    save_fashion_classifier(classifier, tmp_path)
    loaded = load_fashion_classifier(tmp_path, train_if_missing=False)
    assert loaded.test_accuracy == accuracy
    assert torch.equal(loaded(images), classifier(images))

    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert)})
    torch.manual_seed(0)
    model = DuetModel.build(cfg).eval()
    generated = torch.rand(4, 3, 16, 16) * 2 - 1
    metrics = generated_image_metrics(model, ["a red dress"] * 4, generated, real_features=torch.randn(6, 32),
                                      dataset="fashion", labels=[3, 3, 3, 3], classifier=loaded)
    assert 0.0 <= metrics["fashion_classifier_accuracy"] <= 1.0 and metrics["fd_duet_features"] > 0
    assert 0.0 <= metrics["image_text_score"] <= 100.0 and "oracle" not in metrics


def test_evaluate_on_the_fashion_set_scores_generated_images_with_the_classifier(tmp_path, tiny_bert, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "run" / "best_model", tiny_bert, tmp_path / "data")
    classifier = train_fashion_classifier(limit=256, batch_size=32, max_steps=3)
    classifier.test_accuracy = 0.5
    save_fashion_classifier(classifier, tmp_path / "data")   # evaluate.py must find it, not train a new one
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoint", str(checkpoint), "--dataset", "fashion", "--out", str(out),
                          "--num-generated", "3", "--steps", "2", "--no-meteor"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    generation = metrics["generation"]
    assert metrics["dataset"] == "fashion" and generation["fashion_classifier_test_accuracy"] == 0.5
    assert 0.0 <= generation["fashion_classifier_accuracy"] <= 1.0
    assert 0.0 <= generation["fashion_classifier_accuracy_real"] <= 1.0 and "oracle" not in generation
    assert "fashion classifier accuracy on the generated images" in (out / "report.md").read_text()
