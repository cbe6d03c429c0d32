"""Webdataset shards as a stream, on webdataset's pipeline stages as open_clip's get_wds_dataset uses them: the
shards are shuffled per epoch in the same order on every rank, split by rank and then by loader worker, read, and
shuffled again in a buffer of samples.

Epoch mode: epoch e's shard order is a permutation seeded by (train.seed, e); rank r takes every R-th shard and its
loader worker w every W-th of those (webdataset's split_by_node, then split_by_worker). Every rank yields the same
number of batches, batches_per_epoch = samples_per_epoch // (batch_size * R), so no rank waits at an epoch's end:
a rank's batches are shared among its workers in proportion to the samples their shards hold (sizes.json, else an
even estimate); a worker whose shards run out reads them again (some samples repeat), one that holds more stops
early. Resampled mode (data.dataset_resampled): each worker draws shards with replacement, seeded by (seed, epoch,
rank, worker), for sets too large for epochs; any shard count works.

Resume (set_epoch(epoch, start_batch)): in epoch mode the stream goes on exactly as an uninterrupted run would
after start_batch batches (each worker reads past, without decoding, the samples its consumed batches held):
nothing repeats and nothing is skipped, at the cost of reading those bytes again. In resampled mode the rest of
the epoch is drawn afresh, seeded by the resume point: nothing is read twice, and the samples differ from an
uninterrupted run's (as with open_clip's --dataset-resampled).
"""
from __future__ import annotations

import functools
import io
import logging
import random
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from common.images import from_uint8
from configs.errors import UserError
from data.coco import CocoCaptions, tokenize_captions
from data.collate import collate_captions
from data.shard_files import find_shard_set, parse_sample, warn_bad_shard
from data.transforms import IMAGE_ERRORS, read_image

logger = logging.getLogger(__name__)

# Samples buffered for shuffling within a worker; they are held encoded and decoded after the buffer.
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 1000, 100
EMPTY_ID = -1   # the id of the stand-ins for samples a worker's shards could not give (see ShardStream._samples)


def _seed(*parts: int) -> int:
    return wds.utils.make_seed(*(int(p) for p in parts))   # ints only: str hashes differ between processes


def _worker_seed(rank: int, role: int) -> int:
    """ResampledShards' per-worker seed (its default reads the rank from the environment)."""
    return rank * 100_003 + role


def share(batches: int, weights: list[float]) -> list[int]:
    """batches split in proportion to weights, in whole batches (largest remainder; ties to the lower index)."""
    total = sum(weights)
    exact = [batches * w / total for w in weights] if total > 0 else [batches / len(weights)] * len(weights)
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:batches - sum(counts)]:
        counts[i] += 1
    return counts


def consumed(quotas: list[int], batches: int) -> tuple[list[int], int]:
    """After `batches` batches of a loader whose workers hold quotas[w] batches: how many each worker gave, and
    which worker gives the next. A DataLoader takes one batch from each worker in turn, passing over those that
    are done."""
    done, role = [0] * len(quotas), 0
    for _ in range(batches):
        while done[role] >= quotas[role]:
            role = (role + 1) % len(quotas)
        done[role] += 1
        role = (role + 1) % len(quotas)
    return done, role


class ShardStream(IterableDataset):
    """This rank's samples of an epoch, read from tar shards: CocoCaptions' sample dicts ({"images", "input_ids",
    "attention_mask", "image_id", "caption"}, or {"unreadable": image_id} for a sample with no image that decodes
    or no caption that is text), one random caption per image per epoch (drawn as CocoCaptions' random mode does).

    Batch it with stream_loader(stream): every loader worker yields whole batches of batch_size, and every rank
    batches_per_epoch - start_batch of them (len(loader)). Call set_epoch before each epoch's iterator starts:
    loader workers copy the stream then.
    """

    def __init__(self, urls: list[str], sizes: dict[str, int], tokenizer, image_size: int, max_caption_len: int,
                 batch_size: int, num_workers: int, batches_per_epoch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, resampled: bool = False):
        self.urls = list(urls)
        estimate = float(np.mean(list(sizes.values()))) if sizes else 1.0
        self.weights = {url: float(sizes.get(url, estimate)) for url in self.urls}
        self.tokenizer, self.image_size, self.max_caption_len = tokenizer, image_size, max_caption_len
        self.batch_size, self.num_workers, self.batches_per_epoch = batch_size, num_workers, batches_per_epoch
        self.rank, self.world_size, self.seed, self.resampled = rank, world_size, seed, resampled
        self.workers = max(1, num_workers)   # 0 workers: the main process reads, as worker 0 of 1
        self.note, self.empty_shards = "", []
        self._warned: set[str] = set()   # sample keys already logged, per process
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to read next, from its batch start_batch (resume: the batches of it already trained on)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {self.batches_per_epoch} batches")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.quotas = self._quotas()
        # The resumed loader's worker 0 plays the part of the worker whose turn was next.
        self.done, self.first_role = consumed(self.quotas, start_batch)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def epoch_shards(self) -> list[str]:
        """Every shard in this epoch's order: the same on every rank (seeded by seed and epoch)."""
        order = list(self.urls)
        random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        return order

    def worker_shards(self, role: int) -> list[str]:
        """The shards worker `role` of this rank reads this epoch: wds.split_by_node then wds.split_by_worker's
        islices, with the rank and worker given rather than read from the environment."""
        of_rank = islice(self.epoch_shards(), self.rank, None, self.world_size)
        return list(islice(of_rank, role, None, self.workers))

    def _quotas(self) -> list[int]:
        """Batches each of this rank's workers yields this epoch."""
        if self.resampled:
            return share(self.batches_per_epoch, [1.0] * self.workers)
        weights = [sum(self.weights[u] for u in self.worker_shards(role)) for role in range(self.workers)]
        return share(self.batches_per_epoch, weights)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        assert workers == self.workers, (f"the stream was built for {self.workers} loader workers, the loader has "
                                         f"{workers}: batch it with stream_loader(stream)")
        role = (self.first_role + worker) % self.workers
        left = (self.quotas[role] - self.done[role]) * self.batch_size
        if self.resampled:
            fresh = self.start_batch   # a resumed epoch draws anew
            shards = functools.partial(self._resampled_source, role, fresh)
            return self._samples(shards, left, 0, role, fresh)
        skip = self.done[role] * self.batch_size
        shards = functools.partial(self._epoch_source, self.worker_shards(role))
        return self._samples(shards, skip + left, skip, role, 0)

    @staticmethod
    def _epoch_source(shards: list[str], attempt: int):
        return wds.SimpleShardList(shards) if shards else []

    def _resampled_source(self, role: int, fresh: int, attempt: int):
        return wds.ResampledShards(self.urls, nshards=len(self.urls), seed=_seed(self.seed, self.epoch, fresh, attempt),
                                   worker_seed=functools.partial(_worker_seed, self.rank, role), deterministic=True)

    def _samples(self, shards, total: int, skip: int, role: int, fresh: int):
        """The worker's first `total` samples, the first `skip` of them read but not decoded. A pass over the shards
        that ends early starts another; one that yields nothing (every shard unreadable) is filled with
        {"unreadable"} stand-ins, so the rank still yields its batches and no other rank waits for it."""
        count, attempt = 0, 0
        while count < total:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, role, attempt, fresh))
            pipeline = wds.DataPipeline(shards(attempt), wds.tarfile_to_samples(handler=warn_bad_shard),
                                        wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL, rng=rng))
            before = count
            for raw in pipeline:
                if count >= skip:
                    yield self._sample(raw)
                count += 1
                if count == total:
                    return
            if count == before:
                logger.warning("rank %d worker %d: its shards hold no readable sample; %d stand-ins keep its batch "
                               "count", self.rank, role, total - count)
                for position in range(count, total):
                    if position >= skip:
                        yield {"unreadable": EMPTY_ID}
                return
            attempt += 1

    def _sample(self, raw: dict) -> dict:
        sample = parse_sample(raw)
        problem = ""
        if sample.image is None or sample.captions is None:
            problem = "no image member or no caption that is text"
        else:
            try:
                pixels = read_image(io.BytesIO(sample.image), self.image_size)
            except IMAGE_ERRORS as err:
                problem = f"its {sample.image_key} does not decode ({err})"
        if problem:
            if sample.key not in self._warned:   # once per sample and process; the loop counts every skip
                self._warned.add(sample.key)
                logger.warning("skipping sample %s of %s: %s", sample.key, raw.get("__url__"), problem)
            return {"unreadable": sample.image_id}
        # As CocoCaptions' random mode: the caption is drawn from (seed, epoch, image id).
        rng = np.random.default_rng([self.seed, self.epoch, sample.image_id])
        caption = sample.captions[int(rng.integers(len(sample.captions)))]
        input_ids, attention_mask = tokenize_captions(self.tokenizer, [caption], self.max_caption_len)
        return {"images": from_uint8(pixels), "input_ids": torch.from_numpy(input_ids[0].astype(np.int64)),
                "attention_mask": torch.from_numpy(attention_mask[0].astype(np.int64)),
                "image_id": sample.image_id, "caption": caption}


def build_stream(cfg, tokenizer, rank: int = 0, world_size: int = 1) -> tuple[ShardStream, CocoCaptions, int]:
    """(train stream, map-style val split, samples per epoch across all ranks) for the webdataset shards cfg.data
    names; one stream per rank. The val split is the set's val/ shards or its held-out ones, read into memory
    (data.limit_val caps it). Each rank trains on batches_per_epoch batches of train.batch_size per epoch."""
    from data.datasets import build_split, dataset_folder, resolve_dataset_name, resolve_format

    d, t = cfg.data, cfg.train
    name = resolve_dataset_name(cfg)
    fmt = resolve_format(cfg, name)
    if fmt != "webdataset":
        raise UserError(f"{name} is read as {fmt}, not webdataset shards; it trains through build_datasets (or set "
                        f"data.format=webdataset)")
    shards = find_shard_set(name, d.train_split, d.val_split, d.val_fraction)
    workers = max(1, t.num_workers)
    if not d.dataset_resampled and len(shards.train) < world_size * workers:
        raise UserError(f"{name} has {len(shards.train)} train shard(s), fewer than {world_size} process(es) x "
                        f"{workers} loader worker(s): each needs its own shard in an epoch; write more, smaller "
                        f"shards (python -m data.convert SRC OUT --shard-size N), lower train.num_workers, or set "
                        f"data.dataset_resampled=true")
    unknown = [u for u in shards.train if u not in shards.sizes]
    if d.train_num_samples:
        samples = d.train_num_samples
    elif unknown:
        raise UserError(f"the sample count of {unknown[0]} is unknown (no entry in a sizes.json beside it); set "
                        f"data.train_num_samples=N, or write the shards with python -m data.convert, which records "
                        f"it")
    else:
        samples = sum(shards.sizes[u] for u in shards.train)
    batches = samples // (t.batch_size * world_size)
    if batches < 1:
        raise UserError(f"{name} holds {samples} train samples, fewer than one batch of train.batch_size="
                        f"{t.batch_size} per process ({world_size}); lower train.batch_size")
    stream = ShardStream(shards.train, shards.sizes, tokenizer, cfg.model.image_size, cfg.model.max_caption_len,
                         t.batch_size, t.num_workers, batches, rank, world_size, t.seed, d.dataset_resampled)
    stream.note, stream.empty_shards = shards.note, shards.empty
    val = build_split(cfg, name, dataset_folder(cfg, name), d.val_split, tokenizer, d.limit_val, "random")
    return stream, val, batches * t.batch_size * world_size


def stream_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """The loader a stream was built for: its batch size and worker count, batches from collate_captions.
    Not persistent: workers must copy the stream after each set_epoch."""
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.num_workers,
                      collate_fn=collate_captions, pin_memory=pin_memory,
                      # its own generator: making an iterator must not consume the global RNG (resume)
                      generator=torch.Generator().manual_seed(stream.seed))
