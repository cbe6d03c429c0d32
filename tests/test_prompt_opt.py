"""Prompt optimisation (specialize/prompt_opt.py and friends): strategies, budgeted search, PEZ, reports, the SD
backend on a tiny random pipeline, and one-line errors for bad input. Weights must never change."""
import hashlib
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs.loading import load_config
from models.checkpoint import save_checkpoint
from models.duet import DuetModel
from specialize.adapters import weights_checksum
from specialize.attributes import (ATTRIBUTE_STRATEGIES, STRATEGIES, GroupScores, PromptStyle, TextEmbeddingCache,
                                   attribute_choice, compose_prompt, load_attribute_tables)
from specialize.cli import main
from specialize.loading import load_duet
from specialize.pez import encode_prompt_embeds, pez_search
from specialize.search import PromptSearch, Proposal, Score

TINTS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240)}
GARMENTS = ("dress", "coat", "bag")
FAST = ["--num-images", "1", "--heldout-images", "1", "--steps", "2", "--pez-steps", "3", "--budget", "5",
        "--num-targets", "2", "--guidance-scale", "2.0"]


def write_tables(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garment.txt").write_text("# types\n# template: a photo of a {}\n" + "\n".join(GARMENTS) + "\n")
    (folder / "colour.txt").write_text("# template: a photo of a {} {garment}\n" + "\n".join(TINTS) + "\n")
    (folder / "style.txt").write_text("casual\nformal\n")
    return folder


def write_targets(folder: Path, count: int = 3) -> Path:
    """A COCO-format val split of tinted squares carrying the fashion set's label fields."""
    (folder / "val").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(count):
        tint, garment = list(TINTS)[i % 3], GARMENTS[i % 3]
        pixels = (rng.uniform(0.3, 1, (16, 16, 1)) * TINTS[tint]).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "val" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "label": i % 3, "label_name": garment, "tint": tint})
        annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"a photo of a {tint} {garment}"})
    (folder / "captions_val.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


def folder_checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert):
    """A tiny Duet checkpoint, attribute tables and a target folder, shared by the module's tests."""
    root = tmp_path_factory.mktemp("prompt_opt")
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert)})
    torch.manual_seed(0)
    save_checkpoint(DuetModel.build(cfg), root / "ckpt")
    return {"ckpt": root / "ckpt", "tables": write_tables(root / "tables"), "targets": write_targets(root / "data"),
            "root": root}


def run_args(ws, out: Path, *extra: str) -> list[str]:
    return ["--mode", "prompt", "--checkpoint", str(ws["ckpt"]), "--attributes", str(ws["tables"]),
            "--dataset", str(ws["targets"]), "--out", str(out), "--device", "cpu", "--cache-dir", "", *FAST, *extra]


def features(**confidences) -> dict[str, GroupScores]:
    """Hand-made zero-shot features: group -> (values best first, their probabilities)."""
    table = {"garment": (["dress", "coat"], [0.9, 0.1]), "colour": (["red", "blue"], [0.6, 0.3]),
             "style": (["casual", "formal"], [0.3, 0.28])}
    for group, top in confidences.items():
        values, probs = table[group]
        table[group] = (values, [top, probs[1]])
    return {g: GroupScores(g, v, p) for g, (v, p) in table.items()}


# ---- strategies and search (no model) ----

def test_every_strategy_builds_a_prompt_and_naive_is_the_type_alone():
    style = PromptStyle()
    prompts = {s: compose_prompt(attribute_choice(s, features(), style), style) for s in ATTRIBUTE_STRATEGIES}
    assert prompts["type_only"] == "a photo of a dress"
    assert prompts["top1"] == "a photo of a casual red dress"
    assert prompts["high_confidence"] == "a photo of a red dress"          # style at 0.3 < 0.5 is dropped
    assert prompts["all_attributes"] == "a photo of a casual and formal red and blue dress"
    assert compose_prompt({"garment": ("trousers",), "colour": ("orange",)}, style) == "a photo of orange trousers"
    assert compose_prompt({"garment": ("coat",), "colour": ("orange",)}, style) == "a photo of an orange coat"


def test_best_is_the_argmax_and_duplicates_cost_nothing():
    scores = {"p0": 0.2, "p1": 0.7, "p2": 0.5, "p3": 0.65}
    calls = []

    def evaluate(prompt):
        calls.append(prompt)
        return Score(scores[prompt], None, scores[prompt])

    search = PromptSearch(evaluate, budget=10)
    proposals = [Proposal("type_only", "p0"), Proposal("a", "p1"), Proposal("b", "p1"), Proposal("c", "p2"),
                 Proposal("d", "p3")]
    best = search.run(iter(proposals))
    assert best.prompt == "p1" and best.strategy == "a"
    assert best.score == max(c.score for c in search.candidates)
    assert calls == ["p0", "p1", "p2", "p3"] and search.evaluations == 4
    assert search.candidates[2].duplicate_of == "a"


def test_budget_and_patience_stop_the_search_before_the_next_proposal_is_made():
    made = []

    def proposals():
        for i in range(100):
            made.append(i)
            yield Proposal(f"s{i}", f"p{i}")

    search = PromptSearch(lambda p: Score(int(p[1:]), None, int(p[1:])), budget=3)
    search.run(proposals())
    assert search.evaluations == 3 and search.stopped == "budget" and len(made) == 3

    made.clear()  # falling scores: the first stays best, patience 2 allows two more evaluations
    search = PromptSearch(lambda p: Score(-int(p[1:]), None, -int(p[1:])), budget=50, patience=2)
    best = search.run(proposals())
    assert (search.evaluations, search.stopped, best.prompt, len(made)) == (3, "patience", "p0", 3)


def test_text_embedding_cache_is_keyed_by_weights_and_table_content(tmp_path):
    class FakeBackend:
        def encode_texts(self, texts):
            return torch.stack([torch.tensor([float(len(t)), 1.0]) for t in texts])

    tables = load_attribute_tables(write_tables(tmp_path / "tables"))
    first = TextEmbeddingCache(FakeBackend(), tables, tmp_path / "cache", "weights-1")
    first.embed(["a red dress", "a blue bag"])
    first.save()
    again = TextEmbeddingCache(FakeBackend(), tables, tmp_path / "cache", "weights-1")
    assert torch.equal(again.embed(["a blue bag"]), torch.tensor([[10.0, 1.0]])) and again.encoded == 0
    (tmp_path / "tables" / "style.txt").write_text("casual\nsporty\n")
    edited = TextEmbeddingCache(FakeBackend(), load_attribute_tables(tmp_path / "tables"), tmp_path / "cache",
                                "weights-1")
    edited.embed(["a blue bag"])
    assert edited.encoded == 1


# ---- PEZ on a tiny Duet model ----

def test_pez_picks_vocabulary_tokens_and_improves_its_objective(workspace):
    backend = load_duet(workspace["ckpt"], torch.device("cpu"))
    before = weights_checksum(backend.modules())
    ids = backend.tokenizer("a photo of a red dress", add_special_tokens=False)["input_ids"]
    # The hook is exact: the table's own rows give the same embedding as the plain forward.
    input_ids, mask, _ = backend.wrap_prompt_ids(ids)
    assert input_ids[0].tolist() == backend.tokenizer("a photo of a red dress")["input_ids"]   # [CLS] ... [SEP]
    plain = backend.encode_token_ids(input_ids, mask)
    hooked = encode_prompt_embeds(backend, ids, backend.token_embedding.weight[ids])
    assert torch.allclose(plain, hooked, atol=1e-6)

    torch.manual_seed(1)
    target = backend.encode_images(torch.rand(1, 3, 16, 16) * 2 - 1)[0]
    still = pez_search(backend, target, num_tokens=4, steps=8, lr=0.0, seed=0)
    moved = pez_search(backend, target, num_tokens=4, steps=8, lr=0.5, seed=0)
    vocab = set(backend.vocabulary_ids().tolist())
    assert len(moved.token_ids) == 4 and set(moved.token_ids) <= vocab and moved.prompt
    assert len(set(still.history)) == 1                      # no step size: the projection never moves
    assert moved.cosine > moved.history[0] + 0.01
    assert weights_checksum(backend.modules()) == before


# ---- the launcher end to end ----

def test_prompt_mode_writes_reports_and_leaves_weights_unchanged(workspace, tmp_path, capsys):
    files_before = folder_checksums(workspace["ckpt"])
    assert main(run_args(workspace, tmp_path, "--budget", "12", "--patience", "0")) == 0
    assert folder_checksums(workspace["ckpt"]) == files_before
    out = tmp_path / "prompt"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_unchanged"] and summary["targets"] == 2
    assert {"type_only", "selection", "heldout"} <= set(summary["strategies"]) | set(summary)
    for path in sorted((out / "targets").glob("*.json")):
        report = json.loads(path.read_text())
        candidates = report["candidates"]
        assert candidates[0]["strategy"] == "type_only" and candidates[0]["evaluation"] == 1
        assert {c["strategy"] for c in candidates} == set(STRATEGIES)          # every strategy proposed a prompt
        assert all(c["prompt"].strip() for c in candidates)
        assert report["evaluations"] <= 12 and max(c["evaluation"] for c in candidates) == report["evaluations"]
        best = max(candidates, key=lambda c: c["score"])
        assert (report["optimized_prompt"], report["score"]) == (best["prompt"], best["score"])
        assert report["similarity_score"] == best["similarity"]
    assert len(list((out / "targets").glob("*.json"))) == 2
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 3 * 100 and sheet.height > 2 * 100


# ---- Stable Diffusion backend on a tiny random pipeline ----

SD_WORDS = "a photo of red green blue dress coat bag casual formal".split()


def clip_tokenizer():
    """A CLIP BPE tokenizer over characters plus merges that spell SD_WORDS as whole-word tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in SD_WORDS:
        prefix = word[0]
        for i, c in enumerate(word[1:], 1):
            piece = c + ("</w>" if i == len(word) - 1 else "")
            merges.append((prefix, piece))
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=32)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A random SD pipeline (diffusers' get_dummy_components, smaller) and a random CLIPModel, saved to disk."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel)

    root = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=2, attention_head_dim=2)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, image_encoder=None,
                            requires_safety_checker=False).save_pretrained(root / "sd")
    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=37, num_attention_heads=2,
                  num_hidden_layers=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return root


def test_sd_backend_loads_local_folders_and_runs_one_optimisation(workspace, tiny_sd, tmp_path):
    args = run_args(workspace, tmp_path, "--backend", "sd", "--model-path", str(tiny_sd / "sd"),
                    "--clip-path", str(tiny_sd / "clip"), "--num-targets", "1")
    before = folder_checksums(tiny_sd)
    assert main(args) == 0
    summary = json.loads((tmp_path / "prompt" / "summary.json").read_text())
    assert summary["backend"] == "sd" and summary["targets"] == 1 and summary["weights_unchanged"]
    report = json.loads(next((tmp_path / "prompt" / "targets").glob("*.json")).read_text())
    strategies = {c["strategy"] for c in report["candidates"]}
    assert "type_only" in strategies and "caption" not in strategies      # SD has no captioner
    assert folder_checksums(tiny_sd) == before


def test_mode_all_chains_prompt_finetune_compare(monkeypatch, tmp_path):
    from specialize import cli

    calls = []
    for mode, module in cli.MODES.items():
        monkeypatch.setattr(module, "run", lambda args, folders, mode=mode: calls.append((mode, folders[mode])))
    assert cli.main(["--mode", "all", "--out", str(tmp_path)]) == 0
    assert calls == [(mode, tmp_path / mode) for mode in ("prompt", "finetune", "compare")]


# ---- bad input: one line, exit 2 ----

def _bad_inputs(ws, tmp: Path) -> dict[str, list[str]]:
    empty_tables = tmp / "empty_tables"
    empty_tables.mkdir()
    (empty_tables / "garment.txt").write_text("# only a comment\n\n")
    no_images = tmp / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("nothing to see")
    not_a_model = tmp / "not_a_model"
    not_a_model.mkdir()
    cfg = load_config("tiny", {"model.text_encoder": str(ws["ckpt"] / "text_encoder"), "train.diffusion_weight": "0"})
    torch.manual_seed(0)
    save_checkpoint(DuetModel.build(cfg), tmp / "no_t2i")
    base = run_args(ws, tmp / "out")
    return {
        "empty table": [*base, "--attributes", str(empty_tables)],
        "missing tables": [*base, "--attributes", str(tmp / "absent")],
        "no images": [*base, "--dataset", str(no_images)],
        "not diffusers": [*base, "--backend", "sd", "--model-path", str(not_a_model), "--clip-path", str(not_a_model)],
        "no t2i model": [*base, "--checkpoint", str(tmp / "no_t2i")],
    }


def test_bad_input_is_one_line_and_exit_2(workspace, tmp_path, capsys):
    for case, argv in _bad_inputs(workspace, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], (case, err)


def test_fashion_agreement_counts_class_and_tint_matches():
    from data.fashion import FASHION_TINTS
    from evaluation.fashion_classifier import FashionAgreement, estimate_tints
    from specialize.domain import Target

    torch.manual_seed(0)
    grey = torch.rand(1, 1, 16, 16)
    images = torch.cat([grey * torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
                        for rgb in FASHION_TINTS.values()]) * 2 - 1                     # one image per tint
    assert estimate_tints(images, FASHION_TINTS) == list(FASHION_TINTS)

    class FakeClassifier:
        def eval(self):
            return self

        def classify(self, batch):
            return torch.tensor([3, 3, 1, 3, 3])[:len(batch)], None

    scorer = FashionAgreement(FakeClassifier())
    target = Target("1", Path("x.png"), images[1], labels={"label": 3, "tint": list(FASHION_TINTS)[1]})
    assert scorer.agreement(images, target) == pytest.approx((4 / 5 + 1 / 5) / 2)
    assert scorer.parts == pytest.approx({"class": 0.8, "tint": 0.2})
