"""ImageTextGenerator and caption search on a tiny random checkpoint: seeds, batching, decoding strategies, the
KV cache, embeddings and ranking."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs.errors import UserError
from configs.loading import load_config
from inference import ImageTextGenerator  # the import users were promised
from pipelines.images import load_image
from models.caption_search import CaptionOptions, decode_captions, sequence_log_likelihood
from models.checkpoint import save_checkpoint
from models.duet import DuetModel

PROMPTS = ["a red circle on the left", "a small blue square", "a green triangle at the top"]
STEPS = 3


def make_checkpoint(folder, tiny_bert):
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert)})
    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(cfg), folder)


@pytest.fixture(scope="module")
def generator(tiny_bert, tmp_path_factory):
    return ImageTextGenerator(make_checkpoint(tmp_path_factory.mktemp("inference") / "ckpt", tiny_bert), device="cpu")


@pytest.fixture(scope="module")
def pictures():
    """Four distinct 20x24 RGB images (not the model's size, so resize and crop run)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(4)]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_other_seed_another(generator):
    a = generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=7)
    b = generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=7)
    c = generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=8)
    assert a.size == (16, 16) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1


def test_batched_images_equal_one_by_one(generator, tmp_path):
    images = generator.batch_text_to_image(PROMPTS, tmp_path / "out", batch_size=2, num_inference_steps=STEPS, seed=3)
    assert [Path(im.filename).name for im in images] == ["image_000.png", "image_001.png", "image_002.png"]
    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        alone = generator.text_to_image(prompt, num_inference_steps=STEPS, seed=3 + i)
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1  # batched matmuls may round differently
        assert np.array_equal(pixels(Image.open(image.filename)), pixels(image))
    assert len(generator.batch_text_to_image(PROMPTS[:2], num_inference_steps=STEPS)) == 2   # the seed guide's line
    several = generator.text_to_image(PROMPTS[1], num_inference_steps=STEPS, seed=4, num_images=2)
    assert np.abs(pixels(several[0]) - pixels(images[1])).max() <= 1


def test_schedulers_and_guidance_change_the_image(generator, monkeypatch):
    # Leading spacing: on this untrained model, trailing steps start from pure noise, where every sampler's first
    # step lands on nearly the same (tanh-saturated) image.
    monkeypatch.setattr(generator.model.config.sample, "timestep_spacing", "leading")
    ddim = pixels(generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=1))
    # (Euler on the same timesteps is DDIM exactly, as Karras et al. 2022 note, so DPM-Solver++ is the contrast.)
    dpm = pixels(generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=1, scheduler="dpm++"))
    unguided = pixels(generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, seed=1, guidance_scale=1.0))
    assert np.abs(ddim - dpm).mean() > 0.5 and np.abs(ddim - unguided).mean() > 0.5
    with pytest.raises(UserError, match="unknown scheduler"):
        generator.text_to_image(PROMPTS[0], num_inference_steps=STEPS, scheduler="plms")


def test_each_image_depends_only_on_its_own_prompt_seed_and_negative_prompt(generator, monkeypatch):
    """A server batches unrelated requests together: each image must be what its request gets alone, also with
    ddpm, whose steps draw fresh noise."""
    monkeypatch.setattr(generator.model.config.sample, "timestep_spacing", "leading")  # see the test above
    model, seeds, negatives = generator.model, [5, 9, 2], ["", "a blue square", ""]
    batch = model.generate_images(PROMPTS, seeds, STEPS, scheduler="ddpm", negative_prompt=negatives)
    for i in range(len(PROMPTS)):
        alone = model.generate_images(PROMPTS[i:i + 1], seeds[i:i + 1], STEPS, scheduler="ddpm",
                                      negative_prompt=negatives[i])
        torch.testing.assert_close(alone[0], batch[i], atol=2 / 255, rtol=0)  # batched matmuls may round apart
    plain = model.generate_images(PROMPTS[1:2], seeds[1:2], STEPS, scheduler="ddpm")
    assert (plain[0] - batch[1]).abs().mean() > 1e-3  # the negative prompt replaced the null condition
    image = generator.text_to_image(PROMPTS[1], num_inference_steps=STEPS, seed=9, negative_prompt="a blue square")
    assert np.array_equal(pixels(image), pixels(generator.text_to_image(
        PROMPTS[1], num_inference_steps=STEPS, seed=9, negative_prompt="a blue square")))


def test_save_path_with_several_images(generator, tmp_path):
    images = generator.text_to_image(PROMPTS[2], num_inference_steps=1, seed=0, num_images=2,
                                     save_path=tmp_path / "x.png")
    assert len(images) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_000.png", "x_001.png"]


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(do_sample=True, seed=11),
                                     dict(min_length=6, repetition_penalty=1.5)])
def test_batched_captions_equal_one_by_one(generator, pictures, options):
    batched = generator.batch_image_to_text(pictures, batch_size=3, **options)
    seed = options.pop("seed", None)
    alone = [generator.image_to_text(p, seed=None if seed is None else seed + i, **options)
             for i, p in enumerate(pictures)]
    assert batched == alone
    assert all(isinstance(c, str) for c in batched)


def test_image_inputs_path_pil_and_array_agree(generator, pictures, tmp_path):
    path = tmp_path / "p.png"
    pictures[0].save(path)
    as_array = np.asarray(pictures[0])
    assert torch.equal(load_image(path, 16), load_image(pictures[0], 16))
    assert torch.equal(load_image(as_array, 16), load_image(as_array.astype(np.float32) / 255, 16))
    tensor = load_image(pictures[0], 16)
    assert tensor.shape == (3, 16, 16) and -1 <= tensor.min() and tensor.max() <= 1
    assert generator.image_to_text(path) == generator.image_to_text(as_array)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_every_pil_mode_becomes_rgb(mode):
    image = Image.fromarray(np.full((10, 30), 200, dtype=np.uint8)).convert(mode)
    tensor = load_image(image, 8)
    assert tensor.shape == (3, 8, 8) and torch.isfinite(tensor).all()


def image_tokens(generator, pictures):
    images = torch.stack([load_image(p, 16) for p in pictures])
    return generator.model.image_encoder(images)["tokens"]


@torch.no_grad()
def test_kv_cache_gives_the_tokens_of_full_recompute(generator, pictures):
    decoder, tokens = generator.model.caption_decoder, image_tokens(generator, pictures)
    for options in (dict(min_length=16), dict(num_beams=3), dict(do_sample=True, top_p=0.8)):
        runs = []
        for use_cache in (True, False):
            gens = [torch.Generator().manual_seed(i) for i in range(len(pictures))]
            ids, scores = decode_captions(decoder, tokens, CaptionOptions(use_cache=use_cache, **options), gens)
            runs.append((ids, scores))
        assert torch.equal(runs[0][0], runs[1][0]), options
        assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)
    assert runs[0][0].shape[0] == len(pictures)


@torch.no_grad()
def test_beam_search_scores_at_least_greedy(generator, pictures):
    decoder, tokens = generator.model.caption_decoder, image_tokens(generator, pictures)
    greedy_ids, greedy_ll = decode_captions(decoder, tokens, CaptionOptions())
    for row in greedy_ids.tolist():  # [CLS] only first, [PAD] only after [SEP] (an untrained decoder ranks them high)
        words = row[1:row.index(decoder.eos_id)] if decoder.eos_id in row else row[1:]
        assert row[0] == decoder.bos_id and decoder.bos_id not in words and decoder.pad_id not in words
    assert torch.allclose(sequence_log_likelihood(decoder, tokens, greedy_ids), greedy_ll, atol=1e-4)
    eos, pad = decoder.eos_id, decoder.pad_id
    greedy_len = ((greedy_ids != pad) & (greedy_ids != decoder.bos_id)).sum(1).float()  # generated, [SEP] included
    for beams in (2, 4):
        beam_ids, beam_scores = decode_captions(decoder, tokens, CaptionOptions(num_beams=beams))
        assert (beam_scores >= greedy_ll / greedy_len - 1e-5).all()
        assert (beam_scores > greedy_ll / greedy_len + 1e-3).any()  # the search finds better captions
        beam_len = ((beam_ids != pad) & (beam_ids != decoder.bos_id)).sum(1).float()
        beam_ll = sequence_log_likelihood(decoder, tokens, beam_ids)
        assert torch.allclose(beam_ll / beam_len, beam_scores, atol=1e-4)  # the reported score is the real one
    assert (greedy_ids == eos).any() or greedy_ids.shape[1] == decoder.max_len


@torch.no_grad()
def test_sampling_is_reproducible_and_top_p_narrows_to_greedy(generator, pictures):
    decoder, tokens = generator.model.caption_decoder, image_tokens(generator, pictures)

    def sample(seed, **options):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(pictures))]
        return decode_captions(decoder, tokens, CaptionOptions(do_sample=True, **options), gens)[0]

    assert torch.equal(sample(5), sample(5))
    assert not torch.equal(sample(5, top_p=1.0), sample(6, top_p=1.0))
    greedy = decode_captions(decoder, tokens, CaptionOptions())[0]
    assert torch.equal(sample(5, top_p=1e-6), greedy)  # only the most likely token survives
    assert generator.image_to_text(pictures[0], do_sample=True, seed=2) == \
        generator.image_to_text(pictures[0], do_sample=True, seed=2)


@torch.no_grad()
def test_lengths_and_repetition_penalty(generator, pictures):
    decoder, tokens = generator.model.caption_decoder, image_tokens(generator, pictures)
    short = decode_captions(decoder, tokens, CaptionOptions(max_length=5))[0]
    assert short.shape[1] <= 5
    long = decode_captions(decoder, tokens, CaptionOptions(min_length=12))[0]
    first_eos = [(row == decoder.eos_id).nonzero() for row in long]
    assert all(len(e) == 0 or int(e[0]) >= 11 for e in first_eos)  # [SEP] not before position 11 (12 tokens)
    spread = decode_captions(decoder, tokens, CaptionOptions(min_length=16, repetition_penalty=1e4))[0]
    for row in spread:
        words = [t for t in row.tolist() if t not in (decoder.bos_id, decoder.eos_id, decoder.pad_id)]
        assert len(words) == len(set(words))
    with pytest.raises(UserError, match="max_length"):
        generator.image_to_text(pictures[0], max_length=999)
    with pytest.raises(UserError, match="not both"):
        generator.image_to_text(pictures[0], num_beams=2, do_sample=True)


def test_embeddings_are_normalised_and_ranking_orders(generator, pictures):
    image_embeds = generator.embed_images(pictures)
    text_embeds = generator.embed_texts(PROMPTS)
    assert image_embeds.shape == (4, 32) and text_embeds.shape == (3, 32)
    assert torch.allclose(image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(generator.embed_texts(PROMPTS[1]), text_embeds[1:2], atol=1e-6)

    indices, scores = generator.rank_images(PROMPTS[0], pictures, top_k=3)
    expected = (image_embeds @ text_embeds[0]).sort(descending=True)
    assert indices == expected.indices[:3].tolist()
    assert np.allclose(scores, expected.values[:3].tolist(), atol=1e-5)
    assert scores == sorted(scores, reverse=True)

    # An exact duplicate of the query's embedding in the gallery comes first with cosine 1.
    gallery = torch.cat([image_embeds, text_embeds[:1]])
    indices, scores = generator.rank_images(PROMPTS[0], gallery, top_k=None)
    assert indices[0] == 4 and scores[0] == pytest.approx(1.0, abs=1e-5) and len(indices) == 5
    captions = torch.cat([text_embeds, image_embeds[2:3]])
    indices, scores = generator.rank_texts(pictures[2], captions, top_k=2)
    assert indices[0] == 3 and scores[0] == pytest.approx(1.0, abs=1e-5) and len(indices) == 2
    indices, _ = generator.rank_texts(pictures[2], PROMPTS, top_k=10)
    assert sorted(indices) == [0, 1, 2]


def test_api_rejects_bad_input(generator, tmp_path):
    with pytest.raises(UserError, match="empty"):
        generator.text_to_image("   ")
    with pytest.raises(UserError, match="steps"):
        generator.text_to_image(PROMPTS[0], num_inference_steps=0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot read image"):
        generator.image_to_text(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="does not exist"):
        generator.image_to_text(tmp_path / "missing.png")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            ImageTextGenerator(generator.checkpoint, device="cuda")


def test_long_prompt_is_truncated_with_a_warning(generator, caplog):
    long_prompt = " ".join(["red circle"] * 40)
    with caplog.at_level("WARNING", logger="duet.inference"):
        image = generator.text_to_image(long_prompt, num_inference_steps=1, seed=0)
    assert "longer than 16 tokens" in caplog.text
    same = generator.text_to_image(" ".join(["red circle"] * 30), num_inference_steps=1, seed=0)
    assert np.array_equal(pixels(image), pixels(same))  # both cut at max_caption_len tokens


@torch.no_grad()
def test_reduced_caption_vocabulary_maps_back_to_tokenizer_ids(tiny_bert, pictures):
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "model.caption_vocab_size": 12})
    torch.manual_seed(0)
    model = DuetModel.build(cfg)
    tok = model.tokenizer
    words = tok.convert_tokens_to_ids(["red", "blue", "circle", "square", "left", "right", "a", "on"])
    allowed = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id, *words}
    model.caption_decoder.set_vocabulary(sorted(allowed))
    generator = ImageTextGenerator.from_model(model, device="cpu")
    tokens = image_tokens(generator, pictures)
    for options in (dict(min_length=8), dict(num_beams=3), dict(do_sample=True, top_p=1.0)):
        gens = [torch.Generator().manual_seed(i) for i in range(len(pictures))]
        ids, _ = decode_captions(model.caption_decoder, tokens, CaptionOptions(**options), gens)
        assert set(ids.flatten().tolist()) <= allowed and (ids[:, 0] == tok.cls_token_id).all()
        gens = [torch.Generator().manual_seed(i) for i in range(len(pictures))]
        again, _ = decode_captions(model.caption_decoder, tokens, CaptionOptions(use_cache=False, **options), gens)
        assert torch.equal(ids, again)
    captions = generator.batch_image_to_text(pictures, min_length=4)
    assert all(set(c.split()) <= set(tok.convert_ids_to_tokens(words)) for c in captions) and all(captions)
