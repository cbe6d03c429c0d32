"""Webdataset shards streamed (data/shards.py): the samples of the COCO-format twin they were converted from; under a
2-process torchrun (gloo) every training sample is read once per epoch, uneven shards never hang and every rank
yields the same batches; a resumed epoch goes on exactly; resampled mode; bad shards and members are skipped and
counted, or a one-line UserError.

Run as a script (by torchrun, from the test), this file is one rank: it streams two shard sets and writes the
image ids of each batch it saw to a JSON file.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BATCH = 2
UNEVEN = (6, 1, 5, 2, 4, 3, 3)   # samples in each of 7 train shards: 24 in all


def coco_samples(world: Path, split: str) -> list[dict]:
    """The twin's split as webdataset samples (what data/convert.py writes, by hand)."""
    tree = json.loads((world / f"captions_{split}.json").read_text())
    captions = {}
    for ann in tree["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return [{"__key__": f"{img['id']:012d}", "png": (world / split / img["file_name"]).read_bytes(),
             "json": {"captions": captions[img["id"]], "image_id": img["id"]}} for img in tree["images"]]


def write_shards(folder: Path, groups: list[list[dict]], sizes: bool = True) -> list[Path]:
    import webdataset as wds

    folder.mkdir(parents=True)
    paths = [folder / f"shard-{i:06d}.tar" for i in range(len(groups))]
    for path, group in zip(paths, groups):
        with wds.TarWriter(str(path)) as sink:
            for sample in group:
                sink.write(sample)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({p.name: len(g) for p, g in zip(paths, groups)}))
    return paths


def write_set(world: Path, out: Path, train_sizes) -> Path:
    """out/train/ in shards of train_sizes samples, out/val/ in one shard."""
    samples, groups = coco_samples(world, "train"), []
    for size in train_sizes:
        groups.append(samples[:size])
        samples = samples[size:]
    write_shards(out / "train", groups)
    write_shards(out / "val", [coco_samples(world, "val")])
    return out


def stream_config(root: Path, dataset, tiny_bert, **settings):
    from configs.loading import load_config

    return load_config("tiny", {"data.root": str(root), "data.dataset": str(dataset), "model.text_encoder":
                                str(tiny_bert), "train.batch_size": BATCH, **settings})


def epoch_ids(stream, epoch: int, start_batch: int = 0) -> list[list[int]]:
    """The image ids of each batch a loader over the stream yields in an epoch (unreadable samples as None)."""
    from data.shards import stream_loader

    stream.set_epoch(epoch, start_batch)
    batches = []
    for batch in stream_loader(stream):
        assert batch["image_id"].numel() + batch["num_skipped"] == stream.batch_size
        batches.append(batch["image_id"].tolist() + [None] * batch["num_skipped"])
    return batches


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from data.embedded import ensure_embedded

    return ensure_embedded(tmp_path_factory.mktemp("world"), 24, 8, seed=0, workers=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="module")
def shard_sets(world, tmp_path_factory) -> dict[str, Path]:
    from data import convert

    base = tmp_path_factory.mktemp("shards")
    assert convert.main([str(world), str(base / "even"), "--shard-size", "4"]) == 0   # 6 train shards of 4
    return {"even": base / "even", "uneven": write_set(world, base / "uneven", UNEVEN)}


def test_the_stream_gives_the_twins_samples_once_per_epoch(world, shard_sets, tokenizer, tiny_bert, tmp_path):
    import torch

    from data.coco import CocoCaptions
    from data.shards import build_stream, stream_loader

    cfg = stream_config(tmp_path, shard_sets["even"], tiny_bert, **{"train.batch_size": 4})
    stream, val, samples = build_stream(cfg, tokenizer)
    assert (samples, stream.batches_per_epoch, len(stream_loader(stream)), val.num_images) == (24, 6, 6, 8)
    twin = CocoCaptions(world / "captions_train.json", world / "train", tokenizer, 16, 16, "random",
                        seed=cfg.train.seed)
    position = {int(i): p for p, i in enumerate(twin.index.image_ids)}
    orders = []
    for epoch in (0, 1):
        twin.set_epoch(epoch)
        stream.set_epoch(epoch)
        seen = []
        for batch in stream_loader(stream):
            for i, image_id in enumerate(batch["image_id"].tolist()):
                expected = twin[position[image_id]]
                assert torch.equal(batch["images"][i], expected["images"])
                assert batch["caption"][i] == expected["caption"]   # the same caption drawn for (seed, epoch, id)
                assert torch.equal(batch["input_ids"][i], expected["input_ids"])
            seen += batch["image_id"].tolist()
        assert sorted(seen) == sorted(position)
        orders.append(seen)
    assert orders[0] != orders[1]   # shards and samples are shuffled anew each epoch


@pytest.mark.parametrize("kind, start_batch", [("even", 5), ("uneven", 3), ("uneven", 8)])
def test_a_resumed_epoch_goes_on_exactly(kind, start_batch, shard_sets, tokenizer, tiny_bert, tmp_path):
    from data.shards import build_stream

    cfg = stream_config(tmp_path, shard_sets[kind], tiny_bert, **{"train.num_workers": 2})
    whole = epoch_ids(build_stream(cfg, tokenizer)[0], 1)
    resumed = build_stream(cfg, tokenizer)[0]   # a new process would build it anew
    assert epoch_ids(resumed, 1, start_batch) == whole[start_batch:]
    assert len(whole) == 12


def test_resampled_mode_yields_the_epochs_batches_and_draws_a_resumed_rest_afresh(shard_sets, tokenizer, tiny_bert,
                                                                                   tmp_path):
    from data.shards import build_stream

    settings = {"train.num_workers": 2, "data.dataset_resampled": True, "data.train_num_samples": 16}
    stream = build_stream(stream_config(tmp_path, shard_sets["uneven"], tiny_bert, **settings), tokenizer, 1, 2)[0]
    first, again = epoch_ids(stream, 0), epoch_ids(stream, 0)
    assert len(first) == 4 and first == again              # seeded by (seed, epoch, rank, worker)
    assert epoch_ids(stream, 1) != first
    rest = epoch_ids(stream, 0, start_batch=1)
    assert len(rest) == 3 and rest != first[1:]


@pytest.mark.slow
def test_two_ranks_read_each_sample_once_per_epoch_and_never_hang(shard_sets, tiny_bert, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path), str(tiny_bert), str(shard_sets["even"]), str(shard_sets["uneven"])]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):   # 6 shards, 2 ranks x 2 workers: every training image exactly once
        ids = [i for rank in ranks for batch in rank["even"][epoch] for i in batch]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 24
        assert len(ranks[0]["even"][epoch]) == len(ranks[1]["even"][epoch]) == 6
    assert ranks[0]["even"][0] != ranks[0]["even"][1]
    for epoch in (0, 1):   # 7 uneven shards: the same batch count on both ranks (the worker all-reduced each one)
        assert len(ranks[0]["uneven"][epoch]) == len(ranks[1]["uneven"][epoch]) == 6


def test_too_few_shards_a_pattern_of_nothing_and_unknown_sizes_are_user_errors(world, shard_sets, tokenizer,
                                                                               tiny_bert, tmp_path):
    from configs.errors import UserError
    from data.shards import build_stream

    even = shard_sets["even"]
    with pytest.raises(UserError, match=r"6 train shard\(s\), fewer than 4 process\(es\) x 2 loader worker.*"
                                        r"data.dataset_resampled=true"):
        build_stream(stream_config(tmp_path, even, tiny_bert, **{"train.num_workers": 2}), tokenizer, 0, 4)
    with pytest.raises(UserError, match="names 9 file.*do not exist"):
        build_stream(stream_config(tmp_path, f"{even}/train/shard-{{000001..000009}}.tar", tiny_bert), tokenizer)
    write_shards(tmp_path / "nosizes", [coco_samples(world, "train")[i::3] for i in range(3)], sizes=False)
    pattern = f"{tmp_path}/nosizes/shard-{{000000..000002}}.tar"
    with pytest.raises(UserError, match="sample count of .* is unknown.*data.train_num_samples"):
        build_stream(stream_config(tmp_path, pattern, tiny_bert), tokenizer)
    stream, val, samples = build_stream(stream_config(tmp_path, pattern, tiny_bert, **{"data.train_num_samples": 16}),
                                        tokenizer)
    assert samples == 16 and val.num_images == 8 and "holding out 1 of 3 shards" in stream.note == val.note
    assert len(epoch_ids(stream, 0)) == 8


def test_bad_shards_and_members_are_skipped_and_counted_without_changing_the_batch_count(world, tokenizer, tiny_bert,
                                                                                         tmp_path):
    from data.shards import build_stream

    samples = coco_samples(world, "train")
    samples[0]["png"] = b"not an image"
    samples[1]["json"] = {"captions": [5]}                          # a caption that is not text
    samples[2] = {"__key__": samples[2]["__key__"], "txt": "an image that is missing"}
    samples[3]["json"], samples[3]["txt"] = {}, b"\xff\xfe not utf-8"
    paths = write_shards(tmp_path / "bad" / "train", [samples[:8], samples[8:16], samples[16:], []])
    write_shards(tmp_path / "bad" / "val", [coco_samples(world, "val")])
    paths[1].write_bytes(paths[1].read_bytes()[:5000])              # truncated: the rest of it is lost
    paths[3].write_bytes(b"")                                        # empty: a failed download
    (tmp_path / "bad" / "train" / "sizes.json").write_text(json.dumps({p.name: 8 for p in paths}))
    cfg = stream_config(tmp_path, tmp_path / "bad", tiny_bert, **{"train.num_workers": 2})
    stream = build_stream(cfg, tokenizer)[0]
    assert stream.empty_shards == [str(paths[3])] and len(stream.urls) == 3
    batches = epoch_ids(stream, 0)
    assert len(batches) == 12                                        # every batch is there
    flat = [i for batch in batches for i in batch]
    assert flat.count(None) >= 4                                     # the four bad members, counted (and repeats)
    assert set(flat) - {None} <= {int(s["__key__"]) for s in samples[4:]}

    (tmp_path / "junk" / "train").mkdir(parents=True)               # a worker whose only shard is not a tar
    write_shards(tmp_path / "junk" / "val", [coco_samples(world, "val")])
    good = write_shards(tmp_path / "junk" / "good", [samples[4:12]])[0]
    good.rename(tmp_path / "junk" / "train" / "a.tar")
    (tmp_path / "junk" / "train" / "b.tar").write_bytes(b"this is not a tar file" * 100)
    (tmp_path / "junk" / "train" / "sizes.json").write_text(json.dumps({"a.tar": 8, "b.tar": 8}))
    stream = build_stream(stream_config(tmp_path, tmp_path / "junk", tiny_bert, **{"train.num_workers": 2}),
                          tokenizer)[0]
    batches = epoch_ids(stream, 0)
    assert len(batches) == 8 and sum(i is None for b in batches for i in b) == 8   # stand-ins, no hang


def _rank() -> int:
    """One torchrun rank: streams both shard sets for two epochs, all-reducing once per batch, so a rank with fewer
    batches would leave the other waiting (and the collective's timeout would fail the run)."""
    import datetime

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from data.shards import build_stream

    out, tiny_bert, even, uneven = sys.argv[1:5]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    seen = {}
    for name, folder in (("even", even), ("uneven", uneven)):
        cfg = stream_config(Path(out) / f"root{rank}", folder, tiny_bert, **{"train.num_workers": 2})
        stream = build_stream(cfg, tokenizer, rank, world_size)[0]
        seen[name] = []
        for epoch in (0, 1):
            batches = epoch_ids(stream, epoch)
            for _ in batches:
                dist.all_reduce(torch.ones(1))
            seen[name].append(batches)
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank())
