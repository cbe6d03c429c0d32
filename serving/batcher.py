"""The one model thread, and the queue that puts concurrent txt2img requests with the same sampling settings
into one denoising batch. Every image keeps its own seed, so a request's images do not depend on its neighbours."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from configs.errors import UserError

logger = logging.getLogger("duet.serving")


class QueueFull(Exception):
    """More images are waiting than the queue holds; the client should retry later (503 + Retry-After)."""


class ModelFailure(Exception):
    """An exception inside the model; the request gets a 500 with its message and the server keeps serving."""


@dataclass
class _Job:
    key: Hashable                       # sampling settings; only jobs with equal keys share a batch
    future: asyncio.Future
    images: list = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Item:
    job: _Job
    index: int                          # position in the job's images
    args: tuple                         # (prompt, negative prompt, seed)


class Batcher:
    """Runs every model call on one thread (HF tokenizers and the schedulers are not thread-safe), and batches
    txt2img images.

    generate(key, prompts, negatives, seeds) -> images runs one denoising batch; the worker takes the oldest
    waiting image's key and up to max_batch_images waiting images with that key, in arrival order.
    """

    def __init__(self, generate: Callable[[Hashable, list, list, list], list], max_batch_images: int,
                 max_queue_images: int):
        self.generate = generate
        self.max_batch_images = max_batch_images
        self.max_queue_images = max_queue_images
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duet-model")
        self.pending: list[_Item] = []
        self.calls = 0          # captions and embeddings waiting for or on the model thread
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0, "batch_seconds": 0.0, "drawing": 0}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """After the server stopped taking requests: fail what still waits, let the model thread finish."""
        if self._worker is not None:
            self._worker.cancel()
        for item in self.pending:
            if not item.job.future.done():
                item.job.future.set_exception(ModelFailure("the server is shutting down"))
        self.pending.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)

    def retry_after_s(self) -> int:
        """A guess of when the queue will have room: the time to work through what waits, at the recent pace."""
        per_batch = self.stats["batch_seconds"] / max(1, self.stats["batches"])
        return max(1, round(per_batch * len(self.pending) / self.max_batch_images))

    async def run(self, fn: Callable, *args) -> Any:
        """fn(*args) on the model thread (captions, embeddings); a model exception becomes ModelFailure. Such calls
        count against the queue like images, so a flood of them is refused (503) instead of piling up."""
        if self.calls + len(self.pending) >= self.max_queue_images:
            raise QueueFull(f"{self.calls + len(self.pending)} calls and images are waiting "
                            f"(at most {self.max_queue_images})")
        self.calls += 1
        try:
            return await self._call(fn, *args)
        finally:
            self.calls -= 1

    async def _call(self, fn: Callable, *args) -> Any:
        """fn(*args) on the model thread; the worker's own batches come here unadmitted (they were queued)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except UserError:
            raise
        except Exception as err:
            logger.exception("model call failed")
            raise ModelFailure(f"{type(err).__name__}: {err}") from err

    async def submit(self, key: Hashable, prompts: list[str], negatives: list[str], seeds: list[int]) -> list:
        """Queues one request's images; returns them in order once every one is drawn."""
        if len(self.pending) + len(prompts) > self.max_queue_images:
            raise QueueFull(f"{len(self.pending)} images are waiting (at most {self.max_queue_images})")
        job = _Job(key, asyncio.get_running_loop().create_future(), [None] * len(prompts), len(prompts))
        self.pending += [_Item(job, i, args) for i, args in enumerate(zip(prompts, negatives, seeds))]
        self._wake.set()
        return await job.future

    def _take_batch(self) -> list[_Item]:
        self.pending = [item for item in self.pending if not item.job.future.done()]   # failed or abandoned jobs
        if not self.pending:
            return []
        key = self.pending[0].job.key
        batch = [item for item in self.pending if item.job.key == key][:self.max_batch_images]
        taken = set(map(id, batch))
        self.pending = [item for item in self.pending if id(item) not in taken]
        return batch

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            batch = self._take_batch()
            if not batch:
                self._wake.clear()
                continue
            prompts, negatives, seeds = (list(column) for column in zip(*(item.args for item in batch)))
            started = time.perf_counter()
            self.stats["drawing"] = len(batch)
            try:
                images = await self._call(self.generate, batch[0].job.key, prompts, negatives, seeds)
            except (UserError, ModelFailure) as err:
                for item in batch:
                    if not item.job.future.done():
                        item.job.future.set_exception(err)
                continue
            finally:
                self.stats["drawing"] = 0
            self.stats["batches"] += 1
            self.stats["images"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            self.stats["batch_seconds"] += time.perf_counter() - started
            for item, image in zip(batch, images):
                job = item.job
                job.images[item.index] = image
                job.remaining -= 1
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result(job.images)
