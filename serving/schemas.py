"""Request and response bodies. The /sdapi/v1 ones use AUTOMATIC1111's field names and shapes, so an existing
A1111 client works unchanged; fields A1111 has and we do not use (styles, restore_faces, enable_hr, ...) are
accepted and ignored. The limits below are what the README's "Serve" section lists."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 1000          # the model reads model.max_caption_len tokens; this only bounds the work
MAX_STEPS = 150                  # A1111's own UI maximum
MAX_IMAGES_PER_REQUEST = 16      # batch_size * n_iter
MAX_CFG_SCALE = 30.0             # A1111's UI maximum
MAX_SEED = 2**32 - 1             # A1111's seed range; image i uses seed + i
MAX_EMBED_ITEMS = 64             # texts + images in one /v1/embeddings call

Prompt = Field(default="", max_length=MAX_PROMPT_CHARS)


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. None means the checkpoint's sample section (steps, cfg_scale, sampler) or its image
    size (width, height)."""
    model_config = ConfigDict(extra="ignore")

    prompt: str = Prompt
    negative_prompt: str = Prompt    # the unconditional branch of guidance; "" is the trained null condition
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(default=None, ge=0.0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)           # -1: a random seed
    batch_size: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    n_iter: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    sampler_name: str | None = Field(default=None, max_length=64)
    sampler_index: str | None = Field(default=None, max_length=64)   # A1111's older spelling of sampler_name

    @model_validator(mode="after")
    def _bounded_image_count(self):
        if self.batch_size * self.n_iter > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"batch_size * n_iter is {self.batch_size * self.n_iter}; at most "
                             f"{MAX_IMAGES_PER_REQUEST} images per request")
        return self


class Txt2ImgResponse(BaseModel):
    images: list[str]                # base64 PNGs, image i drawn from all_seeds[i]
    parameters: dict[str, Any]       # the request, defaults filled in
    info: str                        # a JSON string: seed, all_seeds, prompts, sampler, ... as A1111 writes it


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1)             # base64, optionally a data: URL
    model: str = Field(default="clip", max_length=64)


class InterrogateResponse(BaseModel):
    caption: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class EmbeddingsRequest(BaseModel):
    """POST /v1/embeddings: texts and/or base64 images into the shared image-text space."""
    model_config = ConfigDict(extra="forbid")    # our own route: a misspelt field is an error, not ignored

    texts: list[str] = Field(default_factory=list, max_length=MAX_EMBED_ITEMS)
    images: list[str] = Field(default_factory=list, max_length=MAX_EMBED_ITEMS)

    @model_validator(mode="after")
    def _some_input(self):
        if not self.texts and not self.images:
            raise ValueError("give 'texts' and/or 'images' (base64) to embed")
        if len(self.texts) + len(self.images) > MAX_EMBED_ITEMS:
            raise ValueError(f"at most {MAX_EMBED_ITEMS} texts and images together per request")
        if any(len(t) > MAX_PROMPT_CHARS for t in self.texts):
            raise ValueError(f"a text is longer than {MAX_PROMPT_CHARS} characters")
        return self


class EmbeddingsResponse(BaseModel):
    model: str
    dim: int
    text_embeds: list[list[float]]    # normalised, one per text, in order
    image_embeds: list[list[float]]   # normalised, one per image; text_embeds @ image_embeds.T are cosines
