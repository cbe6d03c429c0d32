"""Every source format, written from the tiny embedded world's COCO-format twin, gives the twin's images and captions
through build_datasets (cached and not); without a val split a fixed-seed fraction is held out; bad input is skipped
and counted, or a one-line UserError naming the file and the fix; the converter never writes into its source."""
import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from configs.errors import UserError
from configs.loading import load_config
from data import convert
from data.cache import CachedCocoCaptions
from data.coco import CocoCaptions
from data.datasets import (build_datasets, build_split, dataset_folder, resolve_dataset_name, resolve_format,
                           skipped_at_build)
from data.embedded import ensure_embedded

SPLITS = {"train": "train", "val": "validation"}   # ours -> the folder or split name the ecosystem uses


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return ensure_embedded(tmp_path_factory.mktemp("world"), 24, 8, seed=0, workers=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def coco_items(world: Path, split: str) -> list[tuple[Path, list[str]]]:
    """(image path, captions) of the twin's split, in annotation order."""
    tree = json.loads((world / f"captions_{split}.json").read_text())
    captions = {}
    for ann in tree["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return [(world / split / img["file_name"], captions[img["id"]]) for img in tree["images"]]


def write_imagefolder(world: Path, out: Path, table: str = "jsonl") -> Path:
    for split, folder in SPLITS.items():
        (out / folder).mkdir(parents=True)
        rows = []
        for path, captions in coco_items(world, split):
            shutil.copy(path, out / folder / path.name)
            rows.append({"file_name": path.name, "text": captions})
        if table == "jsonl":
            (out / folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:   # one row per caption, as a CSV cell holds one string
            with open(out / folder / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file_name", "text"])
                writer.writerows((r["file_name"], text) for r in rows for text in r["text"])
    return out


def write_csv(world: Path, out: Path) -> Path:
    """open_clip's layout: train.tsv and val.tsv beside each other, filepath/title, one row per caption."""
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
        with open(out / f"{split}.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["filepath", "title"])
            for path, captions in coco_items(world, split):
                shutil.copy(path, out / "images" / split / path.name)
                writer.writerows((f"images/{split}/{path.name}", text) for text in captions)
    return out / "train.tsv"


def write_caption_files(world: Path, out: Path) -> Path:
    for split, folder in SPLITS.items():
        (out / folder).mkdir(parents=True)
        for path, captions in coco_items(world, split):
            shutil.copy(path, out / folder / path.name)
            (out / folder / path.with_suffix(".caption").name).write_text("\n".join(captions) + "\n")
    return out


def write_hf(world: Path, out: Path) -> Path:
    import datasets

    splits = {}
    for split, name in SPLITS.items():
        items = coco_items(world, split)
        table = datasets.Dataset.from_dict({"image": [str(p) for p, _ in items], "text": [c for _, c in items]})
        splits[name] = table.cast_column("image", datasets.Image())
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def write_shards(world: Path, out: Path) -> Path:
    assert convert.main([str(world), str(out), "--shard-size", "5"]) == 0
    return out


WRITERS = {"imagefolder": write_imagefolder, "csv": write_csv, "captions": write_caption_files, "hf": write_hf}


def config(root: Path, dataset, tiny_bert, **data):
    settings = {"data.root": str(root), "data.dataset": str(dataset), "model.text_encoder": str(tiny_bert),
                **{f"data.{k}": v for k, v in data.items()}}
    return load_config("tiny", settings)


def contents(dataset) -> list[tuple[str, tuple[str, ...]]]:
    """Each image as (hash of its pixels at the model's size, its sorted captions), sorted: what a source gives,
    whatever its order and ids."""
    return sorted((hashlib.sha1(dataset.image_tensor(i).numpy().tobytes()).hexdigest(),
                   tuple(sorted(dataset.image_captions(i)))) for i in range(dataset.num_images))


@pytest.fixture(scope="module")
def twin(world, tokenizer, tiny_bert, tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("root"), world, tiny_bert, use_cache=False)
    return [contents(d) for d in build_datasets(cfg, tokenizer)]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_gives_the_samples_of_its_coco_twin(fmt, world, twin, tokenizer, tiny_bert, tmp_path):
    path = WRITERS[fmt](world, tmp_path / "src")
    before = sorted(p.stat().st_mtime_ns for p in tmp_path.joinpath("src").rglob("*"))
    use_cache = fmt in ("hf", "csv")   # the cache path for two formats, the direct one for the others
    cfg = config(tmp_path / "root", path, tiny_bert, use_cache=use_cache)
    assert resolve_format(cfg, resolve_dataset_name(cfg)) == fmt
    train, val = build_datasets(cfg, tokenizer)
    assert type(train) is (CachedCocoCaptions if use_cache else CocoCaptions)
    assert [contents(train), contents(val)] == twin
    assert train.note == val.note == ""   # the files name their val split
    sample = train[0]
    assert sample["images"].shape == (3, 16, 16) and sample["input_ids"].shape == (16,)
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.joinpath("src").rglob("*")) == before


def test_imagefolder_csv_metadata_and_the_webdataset_val_split(world, twin, tokenizer, tiny_bert, tmp_path):
    write_imagefolder(world, tmp_path / "csvmeta", table="csv")
    train, val = build_datasets(config(tmp_path / "root", tmp_path / "csvmeta", tiny_bert), tokenizer)
    assert [contents(train), contents(val)] == twin
    shards = write_shards(world, tmp_path / "shards")
    cfg = config(tmp_path / "root", shards, tiny_bert)
    val = build_split(cfg, str(shards), dataset_folder(cfg, str(shards)), "val", tokenizer, 0, "random")
    assert contents(val) == twin[1]
    with pytest.raises(UserError, match="streamed"):
        build_datasets(cfg, tokenizer)


def test_one_folder_holds_out_a_fixed_seed_fraction(world, tokenizer, tiny_bert, tmp_path):
    for path, captions in coco_items(world, "train"):   # one flat folder of caption files, no val
        shutil.copy(path, tmp_path / path.name)
        (tmp_path / path.with_suffix(".txt").name).write_text(captions[0])
    cfg = config(tmp_path / "root", tmp_path, tiny_bert, val_fraction=0.25, use_cache=False)
    train, val = build_datasets(cfg, tokenizer)
    assert (train.num_images, val.num_images) == (18, 6)
    assert not set(train.index.file_names) & set(val.index.file_names)
    assert "holding out 6 of 24 images" in val.note and val.note == train.note
    again = build_datasets(cfg, tokenizer)[1]
    assert again.index.file_names == val.index.file_names   # fixed seed: the same val every time


def test_open_clip_keys_and_separator_are_found_and_a_missing_column_is_named(world, tokenizer, tiny_bert, tmp_path):
    table = write_csv(world, tmp_path / "oc")
    cfg = config(tmp_path / "root", table, tiny_bert, use_cache=False)
    assert build_datasets(cfg, tokenizer)[0].num_images == 24   # filepath/title found, tab from the .tsv suffix
    cfg = config(tmp_path / "root", table, tiny_bert, caption_column="caption_en")
    with pytest.raises(UserError, match=r"train.tsv has no caption column 'caption_en' \(its columns: filepath, "
                                        r"title\).*data.caption_column"):
        build_datasets(cfg, tokenizer)
    cfg = config(tmp_path / "root", table, tiny_bert, csv_separator=",")
    with pytest.raises(UserError, match="no image column"):
        build_datasets(cfg, tokenizer)


def test_bad_entries_are_counted_and_skipped(world, tokenizer, tiny_bert, tmp_path):
    folder = write_imagefolder(world, tmp_path / "bad")
    meta = folder / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["text"] = 5                               # a caption that is not text: left out at listing
    rows[1]["file_name"] = "gone.png"                 # an image that does not exist: unreadable when read
    (folder / "train" / rows[2]["file_name"]).write_bytes(b"not an image")
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = build_datasets(config(tmp_path / "root", folder, tiny_bert), tokenizer)[0]
    assert train.num_images == 21 and train.skipped_images == 2   # the cache left the two unreadable ones out
    assert {s["file_name"] for s in train.skipped} == {"gone.png", rows[2]["file_name"]}
    assert skipped_at_build(train) == 3                           # and the entry whose caption is a number
    uncached = build_datasets(config(tmp_path / "root", folder, tiny_bert, use_cache=False), tokenizer)[0]
    assert uncached.num_images == 23 and skipped_at_build(uncached) == 1
    assert sum("unreadable" in uncached[i] for i in range(len(uncached))) == 2 * 5   # pairs mode: 5 captions each


def test_the_cache_is_rebuilt_when_captions_or_the_image_list_change(world, tokenizer, tiny_bert, tmp_path):
    folder = write_imagefolder(world, tmp_path / "src")
    cfg = config(tmp_path / "root", folder, tiny_bert)
    first = build_datasets(cfg, tokenizer)[0]
    stamp = (first.cache_dir / "manifest.json").stat().st_mtime_ns
    assert (build_datasets(cfg, tokenizer)[0].cache_dir / "manifest.json").stat().st_mtime_ns == stamp   # reused
    meta = folder / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["text"] = ["a new caption"]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = build_datasets(cfg, tokenizer)[0]
    assert "a new caption" in changed.index.captions
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    assert build_datasets(cfg, tokenizer)[0].num_images == 23


@pytest.mark.parametrize("dataset, data, message", [
    ("{root}/nowhere", {}, "neither auto"),
    ("{root}/shards-{{0000..0003}}.tar", {}, "names 4 file.*4 of which do not exist"),
    ("{root}/empty", {}, "cannot tell the format of .*empty.*data.format"),
    ("{root}/notes.md", {}, "neither a .csv/.tsv table nor a .tar shard"),
    ("{root}/meta", {"format": "imagefolder"}, r"metadata.jsonl line 2 is not JSON"),
    ("{root}/meta", {"format": "csv"}, "takes a .csv/.tsv file"),
])
def test_bad_sources_are_one_line_user_errors(dataset, data, message, tokenizer, tiny_bert, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": \n')
    with pytest.raises(UserError, match=message) as err:
        build_datasets(config(tmp_path / "root", dataset.format(root=tmp_path), tiny_bert, **data), tokenizer)
    assert "\n" not in str(err.value)


def test_the_converter_refuses_an_out_inside_its_source_and_leaves_it_untouched(world, tmp_path, capsys):
    src = write_caption_files(world, tmp_path / "src")
    before = {str(p): p.stat().st_mtime_ns for p in src.rglob("*")}
    assert convert.main([str(src), str(src / "shards")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert convert.main([str(src / "train"), str(src)]) == 2   # the source inside OUT
    assert convert.main([str(src), str(tmp_path / "out"), "--shard-size", "7"]) == 0
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 7, "shard-000001.tar": 7, "shard-000002.tar": 7, "shard-000003.tar": 3}
    assert convert.main([str(src), str(tmp_path / "out")]) == 2          # exists: refused without --overwrite
    assert convert.main([str(src), str(tmp_path / "out"), "--overwrite"]) == 0
    assert convert.main([str(src), str(tmp_path / "fresh"), "--overwrite"]) == 0
    assert convert.main([str(src), str(src.parent / "src"), "--overwrite"]) == 2   # not a folder it wrote
    assert {str(p): p.stat().st_mtime_ns for p in src.rglob("*")} == before
    assert not list(tmp_path.glob("*.tmp*"))
    assert "error:" in capsys.readouterr().err
