"""Training on the ecosystem's formats: shards stream into a joint run (and resume mid-epoch to the same losses), a
run with a diffusion phase reads them into the image cache, and an image folder with metadata.jsonl trains to the
same losses as its COCO-format twin."""
import json
from pathlib import Path

import pytest

import main as cli
from data import convert
from data.embedded import ensure_embedded
from test_sources import write_imagefolder
from training import phases

# 24 train images, batch 8: 3 steps an epoch.
RUN = {"train.max_steps": 5, "train.save_every_steps": 2, "train.val_batches": 1, "train.log_every_steps": 1,
       "data.caption_mode": "random"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return ensure_embedded(tmp_path_factory.mktemp("world"), 24, 8, seed=0, workers=1)


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "world"
    assert convert.main([str(world), str(out), "--shard-size", "4"]) == 0
    return out


def args(tiny_bert, dataset: Path, out: Path, **extra) -> list[str]:
    values = {"model.text_encoder": tiny_bert, "data.dataset": dataset, "data.root": out / "data",
              "train.out_dir": out, **RUN, **extra}
    return ["--config", "tiny", "--set", *[f"{k}={v}" for k, v in values.items()]]


def losses(out: Path) -> dict[int, float]:
    (run,) = [p for p in out.iterdir() if p.is_dir() and p.name != "data"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_shards_stream_into_a_joint_run_that_resumes_mid_epoch(shards, tiny_bert, tmp_path, monkeypatch, capsys):
    assert cli.main(args(tiny_bert, shards, tmp_path / "whole")) == 0
    expected = losses(tmp_path / "whole")
    assert sorted(expected) == [1, 2, 3, 4, 5]
    original, calls = phases.JointPhase.step, []

    def killed(self, micro):
        calls.append(1)
        if len(calls) == 5:                     # the second batch of the second epoch
            raise KeyboardInterrupt
        return original(self, micro)

    with monkeypatch.context() as patch:
        patch.setattr(phases.JointPhase, "step", killed)
        assert cli.main(args(tiny_bert, shards, tmp_path / "killed")) == 130
    assert cli.main([*args(tiny_bert, shards, tmp_path / "killed"), "--resume", "latest"]) == 0
    assert "(joint phase, epoch 1, batch 1)" in capsys.readouterr().err
    resumed = losses(tmp_path / "killed")
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_a_run_with_a_diffusion_phase_reads_the_train_shards_into_the_image_cache(shards, tiny_bert, tmp_path):
    assert cli.main(args(tiny_bert, shards, tmp_path, **{"train.joint_steps": 2})) == 0
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]
    assert any("train" in p.name for p in (tmp_path / "data" / "cache").iterdir())


def test_an_image_folder_trains_as_its_coco_twin(world, tiny_bert, tmp_path):
    folder = write_imagefolder(world, tmp_path / "imagefolder")
    assert cli.main(args(tiny_bert, world, tmp_path / "coco", **{"train.max_steps": 3})) == 0
    assert cli.main(args(tiny_bert, folder, tmp_path / "folder", **{"train.max_steps": 3})) == 0
    twin, ours = losses(tmp_path / "coco"), losses(tmp_path / "folder")
    assert sorted(ours) == [1, 2, 3]
    for step in twin:
        assert ours[step] == pytest.approx(twin[step], abs=1e-5), f"step {step}"
