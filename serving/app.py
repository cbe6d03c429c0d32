"""The HTTP app: AUTOMATIC1111's /sdapi/v1 routes (txt2img, interrogate, samplers, sd-models), our own
/v1/embeddings and /health, and the page at /. create_app takes a loaded ImageTextGenerator; nothing here reads
a path a client sends or writes a file."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from configs.errors import UserError
from data.transforms import resize_center_crop
from models.checkpoint import WEIGHTS_FILE
from pipelines.generator import seed_list
from serving.guard import RequestGuard, error_body
from serving.batcher import Batcher, ModelFailure, QueueFull
from serving.codec import ImageDecodeError, decode_image, encode_png
from serving.samplers import SamplerTable
from serving.schemas import (EmbeddingsRequest, EmbeddingsResponse, InterrogateRequest, InterrogateResponse,
                             SamplerItem, SDModelItem, Txt2ImgRequest, Txt2ImgResponse)
from serving.settings import ServeSettings

PAGE = Path(__file__).parent / "static" / "index.html"
INTERROGATORS = ("clip", "duet")   # A1111's default name and ours; both mean Duet's caption decoder


def model_identity(generator) -> tuple[str, str | None]:
    """(name, sha256 of model.safetensors) of the checkpoint, as /sdapi/v1/sd-models reports them."""
    folder = generator.checkpoint
    if folder is None:
        return "in-memory", None
    weights = Path(folder) / WEIGHTS_FILE
    digest = None
    if weights.is_file():
        sha = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    return f"{Path(folder).parent.name}/{Path(folder).name}", digest


def describe(err: RequestValidationError) -> tuple[int, str]:
    """pydantic's error list -> (status, one readable line): 400 for a body that is not JSON, else 422."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON: " + "; ".join(e.get("ctx", {}).get("error", e["msg"])
                                                                        for e in errors)
    parts = []
    for e in errors:
        field = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {repr(got)[:40]})"
        parts.append(f"{field}: {e['msg']}{shown}")
    return 422, "; ".join(parts)


def create_app(generator, settings: ServeSettings | None = None) -> FastAPI:
    """generator: an ImageTextGenerator (pipelines/generator.py), loaded once by the caller and shared by every request."""
    settings = settings or ServeSettings()
    sample = generator.config.sample
    size = generator.image_size
    samplers = SamplerTable(generator.model.sampler, sample.scheduler)
    model_name, model_sha = model_identity(generator)
    train_timesteps = generator.model.diffusion.noise_scheduler.config.num_train_timesteps   # the most steps

    def generate(key, prompts, negatives, seeds):
        steps, cfg_scale, scheduler = key
        return generator.generate(prompts, seeds, steps, cfg_scale, scheduler, negatives)

    batcher = Batcher(generate, settings.max_batch_images, settings.max_queue_images)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()   # uvicorn has let every in-flight request finish by now

    # Swagger's /docs pages load their scripts from a CDN; the schema stays at /openapi.json.
    app = FastAPI(title="Duet", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        status, detail = describe(err)
        return JSONResponse(error_body("InvalidRequest", detail), status_code=status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return JSONResponse(error_body("HTTPError", str(err.detail)), status_code=err.status_code,
                            headers=err.headers)

    @app.exception_handler(UserError)
    @app.exception_handler(ImageDecodeError)
    async def _user(request: Request, err: Exception):
        return JSONResponse(error_body("InvalidRequest", str(err)), status_code=422)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, err: QueueFull):
        return JSONResponse(error_body("QueueFull", f"{err}; retry later"), status_code=503,
                            headers={"Retry-After": str(batcher.retry_after_s())})

    @app.exception_handler(ModelFailure)
    async def _failed(request: Request, err: ModelFailure):
        return JSONResponse(error_body("ModelError", str(err)), status_code=500)

    def model_sized(data: str, field: str) -> Image.Image:
        """Decoded and brought to the model's size at once, as the CLI preprocesses (shorter side, centre crop):
        a request holds one full-size image at a time, however many it sends."""
        picture = decode_image(data, settings.max_image_bytes, settings.max_image_pixels, field)
        return Image.fromarray(resize_center_crop(picture, size))

    async def images(datas: list[str], field: str) -> list[Image.Image]:
        # decoding takes seconds for large uploads: off the event loop and off the model thread
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: [model_sized(data, field if len(datas) == 1 and field == "image" else f"{field}[{i}]")
                           for i, data in enumerate(datas)])

    @app.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(request: Txt2ImgRequest):
        for name in ("width", "height"):
            value = getattr(request, name)
            if value is not None and value != size:
                raise UserError(f"{name} {value}: this model draws {size}x{size} images; send {size} or leave "
                                f"{name} out")
        sampler_name, scheduler = samplers.resolve(request.sampler_name or request.sampler_index)
        steps = request.steps or sample.steps
        if steps > train_timesteps:
            raise UserError(f"steps {steps}: this model was trained with {train_timesteps} timesteps; send at most "
                            f"{train_timesteps}")
        cfg_scale = sample.guidance_scale if request.cfg_scale is None else request.cfg_scale
        count = request.batch_size * request.n_iter
        seeds = seed_list(None if request.seed == -1 else request.seed, count)   # A1111's rule too: seed + i
        images = await batcher.submit((steps, cfg_scale, scheduler), [request.prompt] * count,
                                      [request.negative_prompt] * count, seeds)
        parameters = {**request.model_dump(), "steps": steps, "cfg_scale": cfg_scale, "sampler_name": sampler_name,
                      "width": size, "height": size}
        return {"images": [encode_png(im) for im in images], "parameters": parameters,
                "info": json.dumps(infotext(request, seeds, steps, cfg_scale, sampler_name))}

    def infotext(request: Txt2ImgRequest, seeds: list[int], steps: int, cfg_scale: float, sampler_name: str):
        """The info JSON A1111 returns (processing.Processed.js), with the fields that mean something here."""
        count = len(seeds)
        line = (f"Steps: {steps}, Sampler: {sampler_name}, CFG scale: {cfg_scale:g}, Seed: {{}}, "
                f"Size: {size}x{size}, Model hash: {(model_sha or '')[:10]}, Model: {model_name}")
        negative = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
        return {
            "prompt": request.prompt, "all_prompts": [request.prompt] * count,
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count,
            "subseed_strength": 0, "width": size, "height": size, "sampler_name": sampler_name,
            "cfg_scale": cfg_scale, "steps": steps, "batch_size": request.batch_size, "n_iter": request.n_iter,
            "restore_faces": False, "sd_model_name": model_name, "sd_model_hash": (model_sha or "")[:10] or None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
            "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": [f"{request.prompt}{negative}\n{line.format(s)}" for s in seeds],
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "version": "duet",
        }

    @app.post("/sdapi/v1/interrogate", response_model=InterrogateResponse)
    async def interrogate(request: InterrogateRequest):
        if request.model.lower() not in INTERROGATORS:
            raise UserError(f"unknown interrogate model '{request.model}'; this server offers "
                            f"{', '.join(INTERROGATORS)} (Duet's caption decoder)")
        caption = await batcher.run(generator.image_to_text, (await images([request.image], "image"))[0])
        return {"caption": caption}

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def list_samplers():
        return samplers.items()

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def list_models():
        short = model_sha[:10] if model_sha else None
        return [{"title": f"{model_name} [{short}]" if short else model_name, "model_name": model_name,
                 "hash": short, "sha256": model_sha, "filename": model_name, "config": None}]

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings(request: EmbeddingsRequest):
        pictures = await images(request.images, "images")
        text_embeds = await batcher.run(generator.embed_texts, request.texts) if request.texts else None
        image_embeds = await batcher.run(generator.embed_images, pictures) if pictures else None
        as_lists = lambda embeds: [] if embeds is None else embeds.float().cpu().tolist()  # noqa: E731
        return {"model": model_name, "dim": generator.config.model.embed_dim,
                "text_embeds": as_lists(text_embeds), "image_embeds": as_lists(image_embeds)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "device": str(generator.device), "image_size": size,
                "sample": asdict(sample), "samplers": list(samplers.available),
                "queue_images": len(batcher.pending), "max_queue_images": settings.max_queue_images,
                "max_batch_images": settings.max_batch_images, **batcher.stats}

    page_html = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return page_html

    return app
