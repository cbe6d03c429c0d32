"""Nothing writes into a user's data: a run, its cache and an evaluation stay out of the dataset folder; generated
worlds of two sizes live side by side; two processes generating one world get one complete set; unreadable images
are counted once, the same by the cache build and the dataset; the one folder writer (common.files.write_folder)
writes a locked folder once, clears what killed writers left and never loses the old folder."""
import hashlib
import json
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

import data.embedded as embedded
import evaluate
import main as cli
from common.files import UnwritableFolder, write_folder
from configs.errors import UserError
from configs.loading import load_config
from data.cache import load_cached_captions, read_manifest
from data.coco import CocoCaptions, resolve_split_files
from data.collate import collate_captions
from data.datasets import build_datasets, cache_name, safe_dataset_name, skipped_at_build
from data.embedded import embedded_folder, ensure_embedded, read_split
from models.checkpoint import save_checkpoint
from models.duet import DuetModel

REPO = Path(__file__).resolve().parents[1]
READABLE, UNREADABLE = 16, 4          # images per split; half the unreadable are missing, half are not images
COLOURS = ("red", "green", "blue", "yellow")


def write_coco_folder(folder: Path) -> Path:
    """folder/{train2017,val2017}/ + annotations/captions_{train,val}2017.json, each split with 4 unreadable images."""
    (folder / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / f"{split}2017").mkdir()
        images, annotations = [], []
        for i in range(READABLE + UNREADABLE):
            name, colour = f"{i:04d}.png", COLOURS[i % len(COLOURS)]
            if i < READABLE:
                Image.new("RGB", (20, 20), colour).save(folder / f"{split}2017" / name)
            elif i % 2:
                (folder / f"{split}2017" / name).write_bytes(b"not an image")
            images.append({"id": i + 1, "file_name": name, "width": 20, "height": 20})
            annotations.append({"id": i + 1, "image_id": i + 1, "caption": f"a {colour} square"})
        tree = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
        (folder / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(tree))
    return folder


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file's sha1 and every folder, by relative path: any write, new file or removal changes it."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> Path:
    return write_coco_folder(tmp_path_factory.mktemp("users") / "mycoco")


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def run_args(tiny_bert, root: Path, dataset: str, out_dir: Path, *settings: str) -> list[str]:
    return ["--config", "tiny", "--dataset", dataset, "--out", str(out_dir), "--set",
            f"model.text_encoder={tiny_bert}", f"data.root={root}", *settings]


def test_a_run_on_a_folder_leaves_it_untouched_and_lands_in_out_dir(coco_folder, tiny_bert, tmp_path, capsys):
    before = tree_hashes(coco_folder)
    runs = tmp_path / "runs"
    assert cli.main(run_args(tiny_bert, tmp_path / "root", str(coco_folder.resolve()), runs)) == 0, \
        capsys.readouterr().err
    assert tree_hashes(coco_folder) == before
    run_dir = runs / safe_dataset_name(str(coco_folder))
    assert [p.name for p in runs.iterdir()] == [run_dir.name] and run_dir.name.startswith("mycoco-")
    assert {"config.json", "latest", "metrics.jsonl", "best_model"} <= {p.name for p in run_dir.iterdir()}
    # the unreadable train images, counted where the cache found them, agree in the log, metrics and summary
    out, err = capsys.readouterr()
    assert f"{UNREADABLE} unreadable train images skipped" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in rows if "val_loss" in r] and \
        all(r["skipped_images"] == UNREADABLE for r in rows if "skipped_images" in r)
    assert f"'skipped_images': {UNREADABLE}" in out
    # a second run of the same name does not replace the first unless told to
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert cli.main(run_args(tiny_bert, tmp_path / "root", str(coco_folder.resolve()), runs)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--resume latest" in line and "--overwrite" in line and (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert cli.main([*run_args(tiny_bert, tmp_path / "root", str(coco_folder.resolve()), runs), "--overwrite"]) == 0


def test_uncached_unreadable_images_count_once_over_epochs_and_captions(coco_folder, tiny_bert, tmp_path, capsys):
    args = run_args(tiny_bert, tmp_path / "root", str(coco_folder), tmp_path / "runs", "data.use_cache=false",
                    "data.caption_mode=pairs", "train.epochs=2", "train.batch_size=4")
    assert cli.main(args) == 0, capsys.readouterr().err
    assert f"'skipped_images': {UNREADABLE}" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["out_dir inside", "out_dir is it", "run_name is it", "absolute run_name",
                                   "run_name with .."])
def test_outputs_in_the_dataset_folder_are_refused(coco_folder, tiny_bert, tmp_path, capsys, where):
    before = tree_hashes(coco_folder)
    out_dir, extra, says = {
        "out_dir inside": (coco_folder / "runs", [], "dataset folder"),
        "out_dir is it": (coco_folder, [], "dataset folder"),
        "run_name is it": (coco_folder.parent, [f"train.run_name={coco_folder.name}"], "dataset folder"),
        "absolute run_name": (tmp_path / "runs", [f"train.run_name={coco_folder}"], "train.run_name"),
        "run_name with ..": (tmp_path / "runs", ["train.run_name=../mycoco"], "train.run_name"),
    }[where]
    assert cli.main(run_args(tiny_bert, tmp_path / "root", str(coco_folder), out_dir, *extra)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert says in line
    assert tree_hashes(coco_folder) == before and not (tmp_path / "runs").exists()


def test_an_out_dir_inside_a_generated_world_is_refused_without_generating_it(tiny_bert, tmp_path, capsys):
    root = tmp_path / "root"
    world = embedded_folder(root, 64, 16, 0)  # the tiny preset's world
    assert cli.main(run_args(tiny_bert, root, "embedded", world / "runs")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(world) in line and not root.exists()


def _tiny_checkpoint(folder: Path, tiny_bert: Path, root: Path, use_cache: bool = True) -> Path:
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "data.root": str(root),
                               "data.use_cache": use_cache})
    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(cfg), folder)


def test_evaluate_out_is_refused_in_the_dataset_folder_and_over_an_earlier_report(coco_folder, tiny_bert, tmp_path,
                                                                                  capsys):
    before = tree_hashes(coco_folder)
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    assert evaluate.main(["--checkpoint", str(tmp_path / "not_loaded"), "--out", str(old)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--overwrite" in line and (old / "metrics.json").read_text() == "{}"

    checkpoint = _tiny_checkpoint(tmp_path / "run" / "best_model", tiny_bert, tmp_path / "root")
    assert evaluate.main(["--checkpoint", str(checkpoint), "--dataset", str(coco_folder),
                          "--out", str(coco_folder / "eval"), "--num-generated", "0", "--no-meteor"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "dataset folder" in line and tree_hashes(coco_folder) == before


@pytest.mark.parametrize("use_cache", [True, False])
def test_evaluate_reports_the_unreadable_images_once(coco_folder, tiny_bert, tmp_path, capsys, use_cache):
    checkpoint = _tiny_checkpoint(tmp_path / "run" / "best_model", tiny_bert, tmp_path / "root", use_cache)
    args = ["--checkpoint", str(checkpoint), "--dataset", str(coco_folder), "--out", str(tmp_path / "eval"),
            "--num-generated", "2", "--steps", "1", "--no-meteor"]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_images"] == UNREADABLE and metrics["retrieval"]["num_images"] == READABLE
    assert f"skipped {UNREADABLE} unreadable image(s)" in capsys.readouterr().out
    assert evaluate.main(args) == 2 and evaluate.main([*args, "--overwrite"]) == 0


def test_two_world_sizes_coexist_with_their_own_caches(tmp_path, tokenizer):
    small = ensure_embedded(tmp_path, 6, 3, workers=1)
    before = tree_hashes(small)
    large = ensure_embedded(tmp_path, 9, 3, workers=1)
    assert small != large and tree_hashes(small) == before
    assert [len(read_split(f, "train")) for f in (small, large)] == [6, 9]
    assert all(len(list((f / "train").iterdir())) == n for f, n in ((small, 6), (large, 9)))
    assert cache_name("embedded", small) != cache_name("embedded", large)
    caches = []
    for count in (6, 9):
        cfg = load_config("tiny", {"data.root": str(tmp_path), "data.embedded_train_images": count,
                                   "data.embedded_val_images": 3})
        caches.append(build_datasets(cfg, tokenizer)[0].cache_dir)
    assert caches[0] != caches[1] and all((c / "manifest.json").is_file() for c in caches)
    assert read_manifest(caches[0])["num_images"] == 6 and tree_hashes(small) == before


def _generate_slowly(log: str, real, *args):
    """Records that this process generated the world, and holds the lock long enough for the other to wait."""
    with open(log, "a") as f:
        f.write("generated\n")
    time.sleep(0.5)
    return real(*args)


def _ensure_world(root: str, start) -> None:
    start.wait()
    ensure_embedded(root, 12, 4, workers=1)


def test_two_processes_generating_one_world_get_one_complete_set(tmp_path, monkeypatch):
    log = tmp_path / "generations.log"
    real = embedded._generate
    monkeypatch.setattr(embedded, "_generate", lambda *args: _generate_slowly(str(log), real, *args))
    context = multiprocessing.get_context("fork")  # the children inherit the patched generator
    start = context.Barrier(2)
    workers = [context.Process(target=_ensure_world, args=(str(tmp_path / "root"), start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert log.read_text() == "generated\n"
    folder = embedded_folder(tmp_path / "root", 12, 4)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == sorted([folder.name, f".{folder.name}.lock"])
    assert len(read_split(folder, "train")) == 12 and len(read_split(folder, "val")) == 4
    assert len(list((folder / "train").iterdir())) == 12


def _stamp(folder: Path, text: str) -> None:
    (folder / "data.txt").write_text(text)
    (folder / "done").write_text("")   # last: marks it complete


def _done(folder: Path) -> bool:
    return (folder / "done").is_file()


def _write_slowly_once(folder: str, log: str, start) -> bool:
    start.wait()

    def write(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("written\n")
        time.sleep(0.5)
        _stamp(tmp, "new")

    write_folder(folder, write, is_complete=_done, lock=True)
    return _done(Path(folder))


def _in_child(*args) -> None:
    if not _write_slowly_once(*args):
        raise SystemExit(1)


@pytest.mark.parametrize("writers", ["processes", "threads"])
def test_locked_folder_is_written_once_and_the_second_writer_finds_it_complete(tmp_path, writers):
    folder, log = tmp_path / "store" / "features", tmp_path / "writes.log"
    if writers == "processes":
        context = multiprocessing.get_context("fork")
        start = context.Barrier(2)
        workers = [context.Process(target=_in_child, args=(str(folder), str(log), start)) for _ in range(2)]
    else:
        start, found = threading.Barrier(2), []
        workers = [threading.Thread(target=lambda: found.append(_write_slowly_once(str(folder), str(log), start)))
                   for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    if writers == "processes":
        assert [w.exitcode for w in workers] == [0, 0]
    else:
        assert found == [True, True]
    assert log.read_text() == "written\n" and (folder / "data.txt").read_text() == "new"
    assert sorted(p.name for p in folder.parent.iterdir()) == [".features.lock", "features"]


def test_leftovers_of_dead_writers_are_removed_and_a_live_writers_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        leftovers = [f"best_model.tmp-{dead.pid}-0", f"best_model.old-{dead.pid}-3", "best_model.tmp",
                     f"best_model.tmp-{live.pid}-0", f"best_model-2.tmp-{dead.pid}-0"]
        for name in leftovers:
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_text("half")
        folder = write_folder(tmp_path / "best_model", lambda tmp: _stamp(tmp, "v1"))
        # a live writer's temporary stays, and so does another folder's
        kept = [f"best_model.tmp-{live.pid}-0", f"best_model-2.tmp-{dead.pid}-0"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best_model", *kept])
        # the lock's holder takes every temporary of its folder for a killed writer's
        write_folder(folder, lambda tmp: _stamp(tmp, "v2"), lock=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best_model", ".best_model.lock", kept[1]])
        assert (folder / "data.txt").read_text() == "v2"
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_a_killed_write_leaves_the_old_folder_and_the_next_write_clears_its_temporary(tmp_path):
    folder = write_folder(tmp_path / "best_model", lambda tmp: _stamp(tmp, "old"))
    code = ("import time\nfrom common.files import write_folder\n"
            "def write(tmp):\n    (tmp / 'data.txt').write_text('half')\n    time.sleep(60)\n"
            f"write_folder({str(folder)!r}, write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("best_model.tmp-*/data.txt")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the write ended before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    assert (folder / "data.txt").read_text() == "old" and _done(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model", f"best_model.tmp-{proc.pid}-0"]
    write_folder(folder, lambda tmp: _stamp(tmp, "new"))
    assert (folder / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]   # no .tmp-/.old- left


def test_write_folder_replaces_a_half_copy_keeps_a_finished_one_and_a_failed_write_changes_nothing(tmp_path):
    folder = tmp_path / "cache"
    (folder / "part").mkdir(parents=True)                          # a half copy: not complete, so replaced
    assert write_folder(folder, lambda tmp: _stamp(tmp, "ours"), is_complete=_done) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["data.txt", "done"]
    assert write_folder(folder, lambda tmp: pytest.fail("rewrote a complete folder"), is_complete=_done) == folder

    def fail(tmp: Path) -> None:
        (tmp / "data.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(folder, fail)
    assert (folder / "data.txt").read_text() == "ours" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    other = tmp_path / "other"

    def write_while_another_finishes(tmp: Path) -> None:
        _stamp(tmp, "ours")
        write_folder(other, lambda theirs: _stamp(theirs, "theirs"))   # another writer lands first

    assert write_folder(other, write_while_another_finishes, is_complete=_done) == other
    assert (other / "data.txt").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cache", "other"]


def test_an_unwritable_place_is_reported_before_anything_is_written(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(UnwritableFolder):
        write_folder(blocker / "features", lambda tmp: pytest.fail("wrote"), is_complete=_done, lock=True)
    with pytest.raises(UserError, match="cannot write in the dataset folder .*set data.root to a writable folder"):
        ensure_embedded(blocker / "root", 5, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_unreadable_images_are_counted_once_where_they_are_found(coco_folder, tokenizer, tmp_path, caplog):
    ann_file, image_dir = resolve_split_files(coco_folder, "train")
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        cached = load_cached_captions(ann_file, image_dir, tmp_path / "cache", "mine", "train", tokenizer, 16, 16,
                                      caption_mode="random")
    assert f"skipped {UNREADABLE} unreadable image(s)" in caplog.text
    assert cached.skipped_images == skipped_at_build(cached) == read_manifest(cached.cache_dir)["num_skipped"]
    assert cached.skipped_images == UNREADABLE and cached.num_images == READABLE
    assert sum(b["num_skipped"] for b in DataLoader(cached, batch_size=8, collate_fn=collate_captions)) == 0
    # The uncached reader finds them only when it reads them: one None sample per image in random mode.
    uncached = CocoCaptions(ann_file, image_dir, tokenizer, 16, 16, caption_mode="random")
    assert skipped_at_build(uncached) == 0
    assert sum(b["num_skipped"] for b in DataLoader(uncached, batch_size=8, collate_fn=collate_captions)) \
        == UNREADABLE
    # build_datasets gives both splits the count of their own cache.
    cfg = load_config("tiny", {"data.root": str(tmp_path / "root"), "data.dataset": str(coco_folder)})
    assert [d.skipped_images for d in build_datasets(cfg, tokenizer)] == [UNREADABLE, UNREADABLE]


def test_specialize_out_in_the_dataset_folder_is_refused(coco_folder, tmp_path, capsys):
    from specialize.cli import main as specialize_main

    before = tree_hashes(coco_folder)
    code = specialize_main(["--mode", "finetune", "--dataset", str(coco_folder), "--out", str(coco_folder / "spec")])
    err = capsys.readouterr().err
    assert code == 2 and "is inside the dataset folder" in err and err.count("\n") == 1
    assert tree_hashes(coco_folder) == before


@pytest.mark.parametrize("mode, leftover", [("prompt", "prompt/summary.json"), ("compare", "compare/compare.json"),
                                            ("all", "finetune/latest")])
def test_specialize_does_not_replace_earlier_results_without_overwrite(coco_folder, tmp_path, capsys, mode, leftover):
    from specialize.cli import main as specialize_main

    out = tmp_path / "spec"
    (out / leftover).parent.mkdir(parents=True)
    (out / leftover).write_text("earlier")
    assert specialize_main(["--mode", mode, "--dataset", str(coco_folder), "--out", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--overwrite" in line and (out / leftover).read_text() == "earlier"
