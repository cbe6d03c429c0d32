"""DuetModel and its components on the tiny preset: shapes, the loss dict, overfitting 8 pairs, freezing BERT,
the diffusion loss's detach, the caption decoder's KV cache and reduced vocabulary, sampler names."""
import copy
import dataclasses

import pytest
import torch

from configs.errors import UserError
from configs.loading import load_config
from models.caption_search import CaptionOptions, decode_captions
from models.diffusion import SCHEDULERS, sampling_scheduler
from models.duet import DuetModel
from training.optim import build_optimizer

# Eight distinct pictures (a coloured square, left or right) and eight distinct captions in tiny BERT's words.
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1),
           "purple": (1, -1, 1), "cyan": (-1, 1, 1), "white": (1, 1, 1), "orange": (1, 0, -1)}
CAPTIONS = [f"a {colour} square on the {'left' if i % 2 else 'right'}" for i, colour in enumerate(COLOURS)]
# Distinct sizes (embed 20, cond 24, BERT hidden 32, token width 16) so a swapped dimension fails loudly.
SHAPE_OVERRIDES = {"model.embed_dim": 20, "model.cond_dim": 24}


def square_images(size: int) -> torch.Tensor:
    """(8, 3, size, size) in [-1, 1]: a coloured square on a gray background, left or right."""
    images = torch.full((len(COLOURS), 3, size, size), -0.5)
    half = size // 2
    for i, rgb in enumerate(COLOURS.values()):
        left = half if i % 2 == 0 else 0
        images[i, :, 2:half + 2, left + 1:left + half - 1] = torch.tensor(rgb, dtype=torch.float).view(3, 1, 1)
    return images


def vocabulary(tokenizer, texts) -> list[int]:
    ids = {i for text in texts for i in tokenizer(text)["input_ids"]}
    specials = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return sorted(ids | set(specials))


def build(tiny_bert, overrides=None, with_vocabulary=True) -> DuetModel:
    """A seeded tiny model whose caption decoder covers CAPTIONS' tokens."""
    from transformers import AutoTokenizer

    overrides = {"model.text_encoder": str(tiny_bert), **(overrides or {})}
    vocab = vocabulary(AutoTokenizer.from_pretrained(tiny_bert), CAPTIONS) if with_vocabulary else None
    if vocab:
        overrides["model.caption_vocab_size"] = len(vocab)
    torch.manual_seed(0)
    model = DuetModel.build(load_config("tiny", overrides))
    if vocab:
        model.caption_decoder.set_vocabulary(vocab)
    return model


def make_batch(model: DuetModel) -> dict:
    return {"images": square_images(model.config.model.image_size), **model.tokenize(CAPTIONS)}


@pytest.fixture(scope="module")
def model(tiny_bert):
    return build(tiny_bert, SHAPE_OVERRIDES).eval()


def test_component_shapes(model):
    m = model.config.model
    B, S, T = 8, m.image_size, m.max_caption_len
    batch = make_batch(model)
    with torch.no_grad():
        encoded = model.image_encoder(batch["images"])
        assert encoded["latents"].shape == (B, m.latent_channels, S // 4, S // 4) == (B, *model.latent_shape)
        assert encoded["tokens"].shape == (B, 16, model.image_encoder.token_dim)
        assert encoded["embeds"].shape == (B, 20)
        decoded = model.image_decoder(encoded["latents"])
        assert decoded.shape == (B, 3, S, S) and decoded.abs().max() <= 1
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (B, T)
        text_embeds, states = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        assert text_embeds.shape == (B, 20) and states.shape == (B, T, 24)
        assert model.text_states(batch["input_ids"], batch["attention_mask"]).shape == (B, T, 24)
        image_embeds = model.encode_image(batch["images"])
        text_embeds = model.encode_text(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(image_embeds.norm(dim=-1), torch.ones(B)) and text_embeds.shape == (B, 20)
        assert torch.allclose(text_embeds.norm(dim=-1), torch.ones(B))
        decoder = model.caption_decoder
        V = m.caption_vocab_size
        logits = decoder(decoder.to_vocab(batch["input_ids"]), decoder.memory(encoded["tokens"]))
        assert logits.shape == (B, T, V) and V < model.tokenizer.vocab_size
        latents = model.encode_latents(batch["images"])
        eps = model.diffusion.unet(latents, torch.full((B,), 5), encoder_hidden_states=states).sample
        assert eps.shape == latents.shape
        assert model.decode_latents(latents).shape == (B, 3, S, S)
    captions = model.caption(batch["images"][:2])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_forward_dict_and_weighted_total(model, monkeypatch):
    batch = make_batch(model)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(batch)
    assert {"loss", "cont", "rec", "diff", "i2t", "t2i"} <= set(out)
    assert all(out[k].ndim == 0 and torch.isfinite(out[k]) for k in out)
    assert torch.allclose(out["rec"], out["img_rec"] + out["cap"])
    assert torch.allclose(out["loss"], out["cont"] + 0.5 * out["rec"] + 0.1 * out["diff"])
    weights = {"contrastive_weight": 0.3, "recon_weight": 2.0, "diffusion_weight": 5.0}
    changed = dataclasses.replace(model.config, train=dataclasses.replace(model.config.train, **weights))
    monkeypatch.setattr(model, "config", changed)
    torch.manual_seed(1)  # the same noise and timesteps: only the weights differ
    with torch.no_grad():
        again = model(batch)
    for k in ("cont", "rec", "diff"):
        assert torch.allclose(again[k], out[k])
    assert torch.allclose(again["loss"], 0.3 * out["cont"] + 2.0 * out["rec"] + 5.0 * out["diff"])


def test_eight_pairs_overfit(tiny_bert):
    model = build(tiny_bert).train()
    batch = make_batch(model)
    bert_before = {k: v.clone() for k, v in model.text_encoder.bert.state_dict().items()}
    optimizer = build_optimizer(model, 3e-3, 0.0)
    torch.manual_seed(0)
    first, solved = None, 0
    for step in range(60):
        out = model(batch)
        first = first or {k: float(out[k].detach()) for k in ("loss", "cont", "rec")}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        solved = solved + 1 if float(out["i2t"]) == float(out["t2i"]) == 1.0 else 0
        if solved == 3:
            break
    assert solved == 3, f"in-batch retrieval not solved after {step + 1} steps: i2t {out['i2t']}, t2i {out['t2i']}"
    model.eval()
    with torch.no_grad():
        final = model(batch)
    assert float(final["i2t"]) == float(final["t2i"]) == 1.0
    assert float(final["cont"]) < 0.5 * first["cont"] and float(final["rec"]) < first["rec"]
    assert float(final["loss"]) < first["loss"]
    # BERT is trained too unless frozen
    assert any(not torch.equal(v, bert_before[k]) for k, v in model.text_encoder.bert.state_dict().items())


def test_freeze_bert_freezes_only_bert(tiny_bert):
    model = build(tiny_bert, {"model.freeze_bert": True}).train()
    bert = model.text_encoder.bert
    assert not bert.training, "a frozen BERT must keep its dropout off in train mode"
    assert not any(p.requires_grad for p in bert.parameters())
    optimized = {id(p) for group in build_optimizer(model, 1e-2, 0.01).param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in bert.parameters()}
    bert_before = {k: v.clone() for k, v in bert.state_dict().items()}
    projection_before = model.text_encoder.embed.weight.detach().clone()
    optimizer = build_optimizer(model, 1e-2, 0.01)
    batch = make_batch(model)
    for _ in range(2):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        assert all(p.grad is None for p in bert.parameters())
        optimizer.step()
    assert all(torch.equal(v, bert_before[k]) for k, v in bert.state_dict().items())
    assert not torch.equal(model.text_encoder.embed.weight, projection_before)


def test_diffusion_loss_sends_no_gradient_into_the_image_encoder(model):
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(make_batch(model))["diff"].backward()
        encoder_grads = [p.grad for p in model.image_encoder.parameters()]
        assert all(g is None or not g.any() for g in encoder_grads)
        # ...while the text states and the UNet do learn from it
        assert model.text_encoder.to_states.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.diffusion.unet.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_kv_cache_step_matches_full_forward(model):
    decoder = model.caption_decoder
    torch.manual_seed(0)
    with torch.no_grad():
        memory = decoder.memory(model.image_encoder(square_images(16)[:3])["tokens"])
        vocab = torch.randint(0, len(decoder.vocab_ids), (3, 9))
        full = decoder(vocab, memory)                                       # (3, 9, V)
        cache = None
        for position in range(vocab.shape[1]):
            logits, cache = decoder.step(vocab[:, position:position + 1], memory, cache, position)
            torch.testing.assert_close(logits, full[:, position], atol=1e-5, rtol=1e-4)
        # a prompt prefix in one call, then token by token; a reordered cache follows its beams
        logits, cache = decoder.step(vocab[:, :4], memory, None, 0)
        torch.testing.assert_close(logits, full[:, 3], atol=1e-5, rtol=1e-4)
        order = torch.tensor([2, 0, 1])
        logits, _ = decoder.step(vocab[order, 4:5], memory[order], decoder.reorder_cache(cache, order), 4)
        torch.testing.assert_close(logits, full[order, 4], atol=1e-5, rtol=1e-4)


def test_caption_decoder_learns_where_each_image_token_sits(model):
    """The same image tokens in mirrored grid order (the left object moved right) are told apart after training:
    cross-attention alone is blind to order, so this needs the tokens' positions."""
    decoder = copy.deepcopy(model.caption_decoder).train()
    torch.manual_seed(0)
    tokens = torch.randn(1, 16, decoder.memory_proj.in_features)
    mirrored = tokens.view(1, 4, 4, -1).flip(2).reshape_as(tokens)                 # columns reversed
    memory = torch.cat([tokens, mirrored])
    ids = model.tokenize([CAPTIONS[0], CAPTIONS[1]])                                # "... left" / "... right"
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(60):
        loss = decoder.loss(ids["input_ids"], ids["attention_mask"], memory)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    with torch.no_grad():   # each caption is more likely under its own grid order than under the mirrored one
        own = [decoder.loss(ids["input_ids"][i:i + 1], ids["attention_mask"][i:i + 1], memory[i:i + 1]) for i in (0, 1)]
        swapped = [decoder.loss(ids["input_ids"][i:i + 1], ids["attention_mask"][i:i + 1], memory[1 - i:2 - i])
                   for i in (0, 1)]
    assert all(o < s - 0.1 for o, s in zip(own, swapped))


def test_kv_cache_several_tokens_after_a_cache(model):
    decoder = model.caption_decoder
    torch.manual_seed(0)
    with torch.no_grad():
        memory = decoder.memory(model.image_encoder(square_images(16)[:2])["tokens"])
        vocab = torch.randint(0, len(decoder.vocab_ids), (2, 6))
        full = decoder(vocab, memory)
        _, cache = decoder.step(vocab[:, :3], memory, None, 0)
        logits, _ = decoder.step(vocab[:, 3:6], memory, cache, 3)
        torch.testing.assert_close(logits, full[:, 5], atol=1e-5, rtol=1e-4)


def test_reduced_vocabulary_maps_ids_back(model):
    decoder, tokenizer = model.caption_decoder, model.tokenizer
    ids = vocabulary(tokenizer, CAPTIONS)
    assert decoder.vocab_ids.tolist() == ids and decoder.head.out_features == len(ids)
    token_ids = torch.tensor(ids)
    assert decoder.to_vocab(token_ids).tolist() == list(range(len(ids)))
    assert torch.equal(decoder.to_token_ids(decoder.to_vocab(token_ids)), token_ids)
    outside = next(i for i in range(tokenizer.vocab_size) if i not in ids)
    assert int(decoder.to_token_ids(decoder.to_vocab(torch.tensor([outside])))) == tokenizer.unk_token_id
    # a caption goes to vocabulary indices and back to the same text
    encoded = model.tokenize(CAPTIONS[:2])["input_ids"]
    back = decoder.to_token_ids(decoder.to_vocab(encoded))
    assert tokenizer.batch_decode(back, skip_special_tokens=True) == CAPTIONS[:2]
    # greedy decoding only emits vocabulary ids, BOS first
    greedy, _ = decode_captions(decoder, model.image_encoder(square_images(16)[:2])["tokens"], CaptionOptions())
    assert set(greedy.flatten().tolist()) <= set(ids) and (greedy[:, 0] == tokenizer.cls_token_id).all()


def test_sampling_scheduler_names(model):
    noise = model.diffusion.noise_scheduler
    expected = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler",
                "euler": "EulerDiscreteScheduler"}
    for name, cls_name in expected.items():
        scheduler = sampling_scheduler(name.upper(), noise)
        assert type(scheduler).__name__ == cls_name
        assert scheduler.config.num_train_timesteps == model.config.train.diffusion_timesteps == 100
        assert scheduler.config.beta_schedule == noise.config.beta_schedule
        images = model.generate_images(CAPTIONS[:2], [0, 1], steps=2, scheduler=name.upper())
        assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1 and torch.isfinite(images).all()
    assert sampling_scheduler("dpm++", noise).config.algorithm_type == "dpmsolver++"
    assert set(expected) <= set(SCHEDULERS)
    with pytest.raises(UserError, match="unknown scheduler 'plms'.*ddim"):
        sampling_scheduler("plms", noise)
