"""The embedded world on disk: COCO format, determinism, held-out pairs, caching and crash safety."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import data.embedded as embedded
from configs.errors import UserError
from data.embedded import HELD_OUT_COMBOS, embedded_folder, ensure_embedded, read_split, world_prompts
from data.oracle import compare, parse_caption, read_image

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return ensure_embedded(tmp_path_factory.mktemp("world"), 200, 100, seed=0)


def test_coco_json_reads_with_pycocotools(world):
    from pycocotools.coco import COCO

    assert world == embedded_folder(world.parent, 200, 100, 0) and world.name == "embedded-200x100-seed0-v2"
    for split, count in (("train", 200), ("val", 100)):
        coco = COCO(str(world / f"captions_{split}.json"))
        assert len(coco.getImgIds()) == count
        for image in coco.loadImgs(coco.getImgIds()[:20]):
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))]
            assert len(captions) == 5 and len(set(captions)) >= 3
            with Image.open(world / split / image["file_name"]) as im:
                assert im.size == (image["width"], image["height"]) == (64, 64) and im.mode == "RGB"
            assert 1 <= len(image["scene"]["objects"]) <= 2
        tree = json.loads((world / f"captions_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations"} <= set(tree)


def test_a_world_drawn_larger_shows_the_same_scenes(world, tmp_path):
    large = ensure_embedded(tmp_path, 200, 100, seed=0, side=128, workers=1)
    assert large.name == "embedded-200x100-seed0-v2-128px"
    for small_record, record in list(zip(read_split(world, "val"), read_split(large, "val")))[:40]:
        assert record["captions"] == small_record["captions"] and record["scene"] == small_record["scene"]
        with Image.open(record["path"]) as im:
            assert im.size == (128, 128)
            assert compare(read_image(im), record["scene"])["all"]


def test_held_out_pairs_only_in_val(world):
    def pairs(split):
        return [(o.colour, o.shape) for r in read_split(world, split) for o in r["scene"].objects]

    train, val = pairs("train"), pairs("val")
    assert not set(train) & set(HELD_OUT_COMBOS)
    assert sum(p in HELD_OUT_COMBOS for p in val) >= 10          # ~25% of val scenes hold one
    for record in read_split(world, "val"):
        assert record["held_out"] == record["scene"].has_held_out()
    # Every colour and every shape of a held-out pair is still seen in train, with other partners.
    assert {c for c, _ in HELD_OUT_COMBOS} <= {c for c, _ in train}
    assert {s for _, s in HELD_OUT_COMBOS} <= {s for _, s in train}


def test_captions_describe_their_scene(world):
    for record in read_split(world, "train")[:50]:
        for caption in record["captions"]:
            assert compare(parse_caption(caption), record["scene"])["all"], caption


def test_same_seed_same_bytes_on_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_CHUNK", 7)                   # several tasks, so two workers really split them
    one = ensure_embedded(tmp_path / "a", 30, 12, seed=3, workers=1)
    two = ensure_embedded(tmp_path / "b", 30, 12, seed=3, workers=2)
    assert _files(one) == _files(two)
    other = _files(ensure_embedded(tmp_path / "c", 30, 12, seed=4, workers=1))
    assert other["captions_train.json"] != _files(one)["captions_train.json"]
    assert sum(other[k] != v for k, v in _files(one).items() if k.endswith(".png")) > 30


def test_second_call_is_cached_and_new_counts_get_their_own_folder(tmp_path, monkeypatch):
    folder = ensure_embedded(tmp_path, 20, 10)
    stamp = (folder / "captions_train.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    with monkeypatch.context() as patch:
        patch.setattr(embedded, "_generate", fail)
        assert ensure_embedded(tmp_path, 20, 10) == folder
    bigger = ensure_embedded(tmp_path, 25, 10)
    assert bigger != folder and len(list((bigger / "train").iterdir())) == 25
    assert len(json.loads((bigger / "captions_train.json").read_text())["images"]) == 25
    assert (folder / "captions_train.json").stat().st_mtime_ns == stamp   # the first world is left as it was
    assert len(list((folder / "train").iterdir())) == 20
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([folder.name, bigger.name, f".{folder.name}.lock", f".{bigger.name}.lock"])  # no temps


def test_failed_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def render_then_die(task):
        calls.append(task)
        if len(calls) > 1:
            raise KeyboardInterrupt                              # as if stopped half-way
        return real(task)

    real = embedded._render_chunk
    monkeypatch.setattr(embedded, "_CHUNK", 5)
    monkeypatch.setattr(embedded, "_render_chunk", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded(tmp_path, 20, 10, workers=1)
    assert not embedded_folder(tmp_path, 20, 10).exists() and not list(tmp_path.glob("*.tmp-*"))
    monkeypatch.setattr(embedded, "_render_chunk", real)
    folder = ensure_embedded(tmp_path, 20, 10, workers=1)
    assert len(read_split(folder, "train")) == 20


@pytest.mark.slow
def test_killed_generation_is_redone(tmp_path):
    """A process killed mid-generation leaves only a temp folder; the next call regenerates from scratch."""
    code = f"from data.embedded import ensure_embedded; ensure_embedded({str(tmp_path)!r}, 20000, 10, workers=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("embedded-*.tmp-*/train/*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "generation ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob("embedded-*.tmp-*")) and not embedded_folder(tmp_path, 20000, 10).exists()
    # A half-copied final folder without its manifest must not pass either.
    half = embedded_folder(tmp_path, 20, 10)
    (half / "train").mkdir(parents=True)
    (half / "captions_train.json").write_text("{}")
    folder = ensure_embedded(tmp_path, 20, 10)
    assert folder == half and len(read_split(folder, "train")) == 20 and len(read_split(folder, "val")) == 10
    assert not list(tmp_path.glob("embedded-*.tmp-*")) and not list(tmp_path.glob("embedded-*.old-*"))


@pytest.mark.parametrize("counts", [(0, 10), (10, -1), (2.5, 10), (True, 10)])
def test_bad_counts_are_user_errors(tmp_path, counts):
    with pytest.raises(UserError, match="embedded_"):
        ensure_embedded(tmp_path, *counts)


def test_world_prompts_are_fixed_val_captions():
    prompts = world_prompts(40, seed=0)
    assert prompts == world_prompts(40, seed=0) and prompts != world_prompts(40, seed=1)
    assert len({caption for caption, _ in prompts}) > 30
    assert any(scene.has_held_out() for _, scene in prompts)
    for caption, scene in prompts:
        assert parse_caption(caption) == scene
