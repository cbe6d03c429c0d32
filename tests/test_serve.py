"""serve.py's app through FastAPI's TestClient on a tiny random checkpoint: every route, A1111's response shapes,
seeds, negative prompts, batching, the API key, and a 4xx/5xx JSON error for each kind of bad request."""
import asyncio
import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from inference import ImageTextGenerator
from serving.app import create_app
from serving.batcher import Batcher, QueueFull
from serving.codec import encode_png
from serving.schemas import MAX_STEPS
from serving.settings import ServeSettings

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def generator(tiny_checkpoint):
    return ImageTextGenerator(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(generator):
    with TestClient(create_app(generator, ServeSettings(max_body_bytes=2**20))) as client:
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def picture(seed: int = 0, size=(20, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def txt2img(client, **body):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_txt2img_has_a1111_shape_and_a_seed_reproduces_each_image(client, generator):
    out = txt2img(client, seed=5, batch_size=2, n_iter=2, cfg_scale=2.5)
    assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 4
    info = json.loads(out["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6, 7, 8] and info["all_prompts"] == [PROMPT] * 4
    assert len(info["infotexts"]) == 4 and "Seed: 6" in info["infotexts"][1]
    assert out["parameters"]["steps"] == 2 and out["parameters"]["cfg_scale"] == 2.5
    first = pixels(out["images"][0])
    assert first.shape == (16, 16, 3)
    assert np.array_equal(first, np.asarray(generator.generate([PROMPT], [5], 2, 2.5, None)[0], dtype=np.int16))
    third = txt2img(client, seed=7, cfg_scale=2.5)["images"][0]     # image i of a request is seed + i alone
    assert np.abs(pixels(out["images"][2]) - pixels(third)).max() <= 1    # batched matmuls may round differently
    assert np.abs(first - pixels(out["images"][1])).mean() > 1


def test_random_seed_is_reported_and_reproduces(client):
    out = txt2img(client, seed=-1)
    seed = json.loads(out["info"])["seed"]
    assert seed >= 0 and txt2img(client, seed=seed)["images"] == out["images"]


def test_defaults_come_from_the_checkpoint_sample_section(client, generator):
    sample = generator.config.sample
    out = txt2img(client, steps=None, seed=1)
    info = json.loads(out["info"])
    assert (info["steps"], info["cfg_scale"]) == (sample.steps, sample.guidance_scale)
    assert info["sampler_name"] == "DDIM" and sample.scheduler == "ddim"
    assert out["parameters"]["width"] == out["parameters"]["height"] == generator.image_size


def test_negative_prompt_is_the_unconditional_branch(client):
    plain = txt2img(client, seed=3)["images"][0]
    assert txt2img(client, seed=3, negative_prompt="")["images"][0] == plain
    negative = txt2img(client, seed=3, negative_prompt="a blue square")["images"][0]
    assert np.abs(pixels(negative) - pixels(plain)).mean() > 0.5
    unguided = txt2img(client, seed=3, cfg_scale=1.0)["images"][0]
    assert txt2img(client, seed=3, cfg_scale=1.0, negative_prompt="a blue square")["images"][0] == unguided


def test_a1111_sampler_names_map_to_our_schedulers(client):
    names = {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M", "DDPM"} == names
    euler_a = txt2img(client, seed=2, sampler_name="Euler a")
    assert json.loads(euler_a["info"])["sampler_name"] == "Euler a"
    assert txt2img(client, seed=2, sampler_name="k_euler_a")["images"] == euler_a["images"]  # ancestral noise seeded
    assert txt2img(client, seed=2, sampler_index="dpm++")["parameters"]["sampler_name"] == "DPM++ 2M"


def test_sd_models_interrogate_embeddings_health(client, generator):
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert model["model_name"] == "run/best_model" and len(model["sha256"]) == 64
    assert model["title"] == f"run/best_model [{model['hash']}]" and set(model) >= {"filename", "config"}

    image = picture()
    caption = client.post("/sdapi/v1/interrogate", json={"image": encode_png(image), "model": "clip"}).json()
    assert caption == {"caption": generator.image_to_text(image)}
    data_url = "data:image/png;base64," + encode_png(image)        # what a browser's FileReader sends
    assert client.post("/sdapi/v1/interrogate", json={"image": data_url}).json() == caption

    out = client.post("/v1/embeddings", json={"texts": [PROMPT, "a blue square"], "images": [encode_png(image)]}).json()
    assert out["dim"] == 32 and len(out["text_embeds"]) == 2 and len(out["image_embeds"]) == 1
    expected = generator.embed_texts([PROMPT, "a blue square"]).numpy()
    assert np.allclose(out["text_embeds"], expected, atol=1e-6)
    assert np.allclose(out["image_embeds"], generator.embed_images([image]).numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(out["image_embeds"], axis=1), 1, atol=1e-5)

    health = client.get("/health").json()
    assert health["status"] == "ok" and health["image_size"] == 16 and health["queue_images"] == 0
    assert health["sample"]["scheduler"] == "ddim"
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text


def test_concurrent_requests_share_a_batch_and_equal_their_single_images(generator):
    """Three requests queued in the same tick form one denoising batch; each image equals its request alone."""
    def generate(key, prompts, negatives, seeds):
        return generator.generate(prompts, seeds, *key, negatives)

    requests = [(PROMPT, "", [11, 12]), ("a blue square", "a red circle", [40]), (PROMPT, "", [11])]

    async def serve(max_batch_images):
        batcher = Batcher(generate, max_batch_images, max_queue_images=16)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit((2, 3.0, "ddim"), [p] * len(s), [n] * len(s), s)
                                         for p, n, s in requests))
        await batcher.stop()
        return results, batcher.stats

    batched, stats = asyncio.run(serve(8))
    assert (stats["batches"], stats["largest_batch"], stats["images"]) == (1, 4, 4)
    alone, stats = asyncio.run(serve(1))
    assert stats["batches"] == 4
    for many, one in zip(batched, alone):
        for a, b in zip(many, one):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


def test_full_queue_refuses_before_queueing():
    async def fill():
        batcher = Batcher(lambda *args: None, max_batch_images=1, max_queue_images=2)   # worker never started
        queued = asyncio.ensure_future(batcher.submit("k", ["a", "b"], ["", ""], [0, 1]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit("k", ["c"], [""], [2])
        assert len(batcher.pending) == 2 and batcher.retry_after_s() >= 1
        queued.cancel()

    asyncio.run(fill())


def test_captions_and_embeddings_count_against_the_queue():
    async def flood():
        release = threading.Event()
        batcher = Batcher(lambda *args: None, max_batch_images=1, max_queue_images=2)
        calls = [asyncio.ensure_future(batcher.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.run(release.wait)
        release.set()
        assert await asyncio.gather(*calls) == [True, True] and batcher.calls == 0
        await batcher.run(release.wait)     # room again

    asyncio.run(flood())


def test_the_worker_draws_a_full_queue_while_a_caption_is_in_flight():
    async def busy():
        release = threading.Event()
        batcher = Batcher(lambda key, prompts, negatives, seeds: [f"{key}:{s}" for s in seeds], max_batch_images=1,
                          max_queue_images=2)
        caption = asyncio.ensure_future(batcher.run(release.wait))       # holds the model thread
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(batcher.submit(key, ["p"], [""], [seed])) for key, seed in (("a", 1), ("b", 2))]
        await asyncio.sleep(0)
        batcher.start()                         # its batches were admitted when queued: never refused
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*jobs), 5) == [["a:1"], ["b:2"]]
        assert await caption is True
        await batcher.stop()

    asyncio.run(busy())


def test_uploads_are_read_as_training_reads_images():
    from serving.codec import decode_image

    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))      # fully transparent red: white, as data.transforms reads it
    pixels = np.asarray(decode_image(encode_png(clear), 2**20, 10**6))
    assert (pixels == 255).all()


def text_file_b64() -> str:
    return base64.b64encode(b"just some words, not an image\n" * 10).decode()


def huge_encode_png() -> str:
    """A 1-bit 5000x5000 PNG: a few kB on the wire, 25 megapixels when decoded."""
    return encode_png(Image.new("1", (5000, 5000)))


BAD_REQUESTS = {   # name: (route, body or raw bytes, status, words the detail must contain)
    "malformed JSON": ("/sdapi/v1/txt2img", b'{"prompt": "a red', 400, "not valid JSON"),
    "prompt of wrong type": ("/sdapi/v1/txt2img", {"prompt": 5}, 422, "prompt"),
    "steps of wrong type": ("/sdapi/v1/txt2img", {"steps": "many"}, 422, "steps"),
    "steps 0": ("/sdapi/v1/txt2img", {"steps": 0}, 422, "steps"),
    "steps 10^6": ("/sdapi/v1/txt2img", {"steps": 10**6}, 422, f"less than or equal to {MAX_STEPS}"),
    "more steps than trained": ("/sdapi/v1/txt2img", {"steps": 101}, 422, "trained with 100 timesteps"),
    "batch 10^4": ("/sdapi/v1/txt2img", {"batch_size": 10**4}, 422, "batch_size"),
    "too many images": ("/sdapi/v1/txt2img", {"batch_size": 8, "n_iter": 8}, 422, "batch_size * n_iter"),
    "cfg NaN": ("/sdapi/v1/txt2img", b'{"cfg_scale": NaN}', 422, "cfg_scale"),
    "long prompt": ("/sdapi/v1/txt2img", {"prompt": "a" * 5000}, 422, "prompt"),
    "seed -2": ("/sdapi/v1/txt2img", {"seed": -2}, 422, "seed"),
    "unknown sampler": ("/sdapi/v1/txt2img", {"sampler_name": "PLMS"}, 422, "unknown sampler 'PLMS'"),
    "wrong size": ("/sdapi/v1/txt2img", {"width": 512}, 422, "16x16"),
    "broken base64": ("/sdapi/v1/interrogate", {"image": "iVBOR$$not base64"}, 422, "not valid base64"),
    "text file as image": ("/sdapi/v1/interrogate", {"image": text_file_b64()}, 422, "not an image"),
    "too many pixels": ("/sdapi/v1/interrogate", {"image": huge_encode_png()}, 422, "5000x5000"),
    "unknown interrogator": ("/sdapi/v1/interrogate", {"image": "AAAA", "model": "deepdanbooru"}, 422, "clip"),
    "50 MB upload": ("/sdapi/v1/interrogate", b'{"image": "' + b"A" * 50_000_000 + b'"}', 413, "larger than"),
    "no embedding input": ("/v1/embeddings", {}, 422, "texts"),
    "misspelt embedding field": ("/v1/embeddings", {"text": ["a"]}, 422, "text"),
    "broken embedding image": ("/v1/embeddings", {"images": ["@@"]}, 422, "images[0]"),
    "unknown route": ("/sdapi/v1/img2img", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_a_json_error_and_the_server_keeps_serving(client, name):
    route, body, status, words = BAD_REQUESTS[name]
    if isinstance(body, bytes):
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(route, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "detail"} and words in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_model_exception_is_a_500_and_the_next_request_works(client, generator, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(generator.model, "generate_images", broken)
    response = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2})
    assert response.status_code == 500 and "CUDA out of memory" in response.json()["detail"]
    monkeypatch.undo()
    assert client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_api_key_guards_every_route_but_the_page(generator):
    with TestClient(create_app(generator, ServeSettings(api_key="s3cret"))) as guarded:
        for method, route in (("get", "/health"), ("get", "/sdapi/v1/samplers"), ("get", "/sdapi/v1/sd-models"),
                              ("post", "/sdapi/v1/txt2img"), ("post", "/v1/embeddings"), ("get", "/openapi.json")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                response = getattr(guarded, method)(route, headers=headers)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
                assert "Authorization: Bearer" in response.json()["detail"]
        key = {"Authorization": "Bearer s3cret"}
        assert guarded.get("/health", headers=key).status_code == 200
        assert guarded.post("/sdapi/v1/txt2img", json={"steps": 1}, headers=key).status_code == 200
        assert guarded.get("/").status_code == 200       # the page holds no data; its requests send the key


def test_a_chunked_body_is_cut_off_at_the_limit_too(client):
    def chunks():   # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}'

    response = client.post("/sdapi/v1/interrogate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


def test_embeddings_of_a_large_upload_equal_the_cli_preprocessing(client, generator):
    big = picture(3, size=(300, 400))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    response = client.post("/v1/embeddings", json={"images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["image_embeds"][0])
    assert np.allclose(served, generator.embed_images([big])[0].numpy(), atol=1e-5)


def test_the_sdapi_client_splits_large_counts_into_requests_the_server_takes(monkeypatch):
    from serving.client import MAX_IMAGES_PER_REQUEST, SdApiClient

    sent = []

    def answer(self, path, body):   # the server's answer to each request: batch_size images
        sent.append(body)
        return {"images": [encode_png(picture(body["seed"] + i, size=(4, 4))) for i in range(body["batch_size"])]}

    monkeypatch.setattr(SdApiClient, "post", answer)
    images = SdApiClient("http://127.0.0.1:1").txt2img("a dress", 100, MAX_IMAGES_PER_REQUEST + 5, 2, 2.0)
    assert [(b["seed"], b["batch_size"]) for b in sent] == [(100, MAX_IMAGES_PER_REQUEST), (116, 5)]
    assert len(images) == MAX_IMAGES_PER_REQUEST + 5
    assert np.array_equal(images[16], np.asarray(picture(116, size=(4, 4))))
