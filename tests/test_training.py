"""The training run on the tiny preset: what it writes, kill-and-resume equals an uninterrupted run, user mistakes
exit 2 with one line, NaN losses abort with the last checkpoint intact, the near-chance guard, sampler and LR."""
import contextlib
import io
import json
import math
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import main as cli
from configs.errors import UserError
from configs.loading import config_from_dict, load_config
from models.checkpoint import load_checkpoint, load_trainer_state, read_config
from models.duet import DuetModel
from training import loop, phases
from training.distributed import DistributedContext
from training.optim import backward, optimizer_step, warmup_cosine
from training.state import EpochSampler

# 32 images, one caption each per epoch, batch 8: 4 steps an epoch, 8 in all; checkpoints at 3, 6 and 8.
RUN = {"data.limit_train": 32, "data.caption_mode": "random", "train.epochs": 2, "train.save_every_steps": 3}
TRAIN_KEYS = ("loss", "cont", "rec", "diff", "i2t", "t2i", "lr", "step_seconds")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def overrides(tiny_bert, data_root, out_dir, **extra) -> dict:
    return {"model.text_encoder": str(tiny_bert), "data.root": str(data_root), "train.out_dir": str(out_dir),
            **RUN, **extra}


def cli_args(settings: dict, *more: str) -> list[str]:
    return ["--config", "tiny", "--set", *[f"{k}={v}" for k, v in settings.items()], *more]


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(rows: list[dict]) -> dict[int, float]:
    losses = {}
    for row in rows:
        if "loss" in row:
            assert row["step"] not in losses, f"step {row['step']} logged twice"
            losses[row["step"]] = row["loss"]
    return losses


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run_a(tiny_bert, data_root, tmp_path_factory):
    """An uninterrupted 2-epoch run: (run folder, summary, the config it ran)."""
    cfg = load_config("tiny", overrides(tiny_bert, data_root, tmp_path_factory.mktemp("run_a")))
    summary = loop.run(cfg)
    return Path(summary["run_dir"]), summary, cfg


def test_run_writes_its_outputs(run_a):
    run_dir, summary, cfg = run_a
    assert run_dir.name == "embedded" and summary["step"] == 8
    names = {p.name for p in run_dir.iterdir()}
    assert {"best_model", "checkpoint-000003", "checkpoint-000006", "checkpoint-000008", "latest", "metrics.jsonl",
            "loss_curve.png", "samples-000004.png", "samples-000008.png", "config.json"} <= names
    assert not [n for n in names if n.endswith((".tmp", ".old"))]
    assert (run_dir / "latest").read_text().strip() == "checkpoint-000008"
    assert load_trainer_state(run_dir / "checkpoint-000008")["step"] == 8
    for png in ("loss_curve.png", "samples-000008.png"):
        with Image.open(run_dir / png) as image:
            assert image.format == "PNG" and min(image.size) > 32
    rows = read_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(set(TRAIN_KEYS) <= set(r) and all(math.isfinite(r[k]) for k in TRAIN_KEYS) for r in train)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert train[-1]["lr"] < train[0]["lr"]  # the cosine schedule decays
    saved = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    assert saved == cfg and saved.model.caption_vocab_size > 0
    best = load_checkpoint(run_dir / "best_model")
    assert best.config.model == read_config(run_dir / "checkpoint-000008").model
    assert not (run_dir / "best_model" / "trainer_state.pt").exists()  # an export, not a resume point
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)




@pytest.mark.parametrize("save_every, killed_at, resumed_from", [
    pytest.param(3, 8, 6, id="mid-epoch"),
    pytest.param(4, 6, 4, id="epoch-end"),
])
def test_kill_and_resume_matches_an_uninterrupted_run(run_a, tiny_bert, data_root, tmp_path, monkeypatch, capsys,
                                                      save_every, killed_at, resumed_from):
    run_dir_a = run_a[0]
    settings = overrides(tiny_bert, data_root, tmp_path, **{"train.save_every_steps": save_every})
    original_step, calls = phases.JointPhase.step, []

    def killed(self, micro_batches):
        calls.append(1)
        if len(calls) == killed_at:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this step
        return original_step(self, micro_batches)

    with monkeypatch.context() as patch:
        patch.setattr(phases.JointPhase, "step", killed)
        assert cli.main(cli_args(settings)) == 130
    run_dir = tmp_path / "embedded"
    assert (run_dir / "latest").read_text().strip() == f"checkpoint-{resumed_from:06d}"
    assert "resume with --resume latest" in capsys.readouterr().err

    assert cli.main(cli_args(settings, "--resume", "latest")) == 0
    assert f"resumed from {run_dir / f'checkpoint-{resumed_from:06d}'}" in capsys.readouterr().err
    assert (run_dir / "latest").read_text().strip() == "checkpoint-000008"
    assert load_trainer_state(run_dir / "checkpoint-000008")["step"] == 8
    expected, resumed = train_losses(read_rows(run_dir_a)), train_losses(read_rows(run_dir))
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    val_a = [(r["step"], r["val_loss"]) for r in read_rows(run_dir_a) if "val_loss" in r]
    val_b = [(r["step"], r["val_loss"]) for r in read_rows(run_dir) if "val_loss" in r]
    assert [s for s, _ in val_b] == [s for s, _ in val_a] == [4, 8]
    assert [v for _, v in val_b] == pytest.approx([v for _, v in val_a], abs=1e-5)
    weights_a = load_file(run_dir_a / "checkpoint-000008" / "model.safetensors")
    weights_b = load_file(run_dir / "checkpoint-000008" / "model.safetensors")
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("field, value", [("model.embed_dim", 16), ("train.learning_rate", 0.5),
                                          ("data.caption_mode", "pairs")])
def test_resume_with_another_config_names_the_field(run_a, tiny_bert, data_root, tmp_path, field, value):
    checkpoint = f"{run_a[0]}/checkpoint-000006"
    cfg = load_config("tiny", overrides(tiny_bert, data_root, tmp_path, **{field: value}))
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        loop.run(cfg, resume=checkpoint)


def test_resume_latest_without_a_checkpoint(tiny_bert, data_root, tmp_path, capsys):
    assert cli.main(cli_args(overrides(tiny_bert, data_root, tmp_path), "--resume", "latest")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "latest" in line


def test_batch_larger_than_the_dataset_exits_2(tiny_bert, data_root, tmp_path, capsys):
    settings = overrides(tiny_bert, data_root, tmp_path, **{"train.batch_size": 1000})
    assert cli.main(cli_args(settings)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "train.batch_size=1000" in line and "32" in line


def test_unwritable_output_folder_exits_2(tiny_bert, data_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(cli_args(overrides(tiny_bert, data_root, blocker / "runs"))) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "output folder" in line and "train.out_dir" in line


@pytest.fixture(scope="module")
def diverged(tiny_bert, data_root, tmp_path_factory):
    """A run whose loss is NaN from its 5th step on: (exit code, stderr, run folder)."""
    original_forward, calls = DuetModel.forward, []

    def nan_from_the_fifth_step(self, batch, **kwargs):
        out = original_forward(self, batch, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) >= 5:
                out["loss"] = out["loss"] * float("nan")
        return out

    out_dir = tmp_path_factory.mktemp("diverged")
    settings = overrides(tiny_bert, data_root, out_dir, **{"train.save_every_steps": 2, "train.max_bad_steps": 3})
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(DuetModel, "forward", nan_from_the_fifth_step)
        code = cli.main(cli_args(settings))
    return code, stderr.getvalue(), out_dir / "embedded"


def test_nan_losses_abort_and_keep_the_last_good_checkpoint(diverged):
    code, err, run_dir = diverged
    assert code != 0 and "Traceback" not in err
    assert err.count("warning: non-finite loss") == 3
    assert "error: training diverged" in err
    assert (run_dir / "latest").read_text().strip() == "checkpoint-000004"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert load_trainer_state(run_dir / "checkpoint-000004")["step"] == 4
    model = load_checkpoint(run_dir / "checkpoint-000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_after_the_progress_bar_starts_its_own_line(diverged):
    (line,) = error_lines(diverged[1])
    assert "diverged" in line and "train.learning_rate" in line


def test_near_chance_guard_warns_once(capsys):
    cfg = load_config("tiny")  # batch 8: chance is 1/8
    trainer = types.SimpleNamespace(cfg=cfg, ctx=DistributedContext(), warmup_steps=10, step=70)
    guard = loop.Trainer._guard_chance
    at_chance = [{"i2t": 0.125, "t2i": 0.125}] * 50
    learning = [{"i2t": 0.75, "t2i": 0.5}] * 50
    assert guard(trainer, at_chance, False) is True
    assert "freeze_bert" in capsys.readouterr().err
    assert guard(trainer, at_chance, True) is True and capsys.readouterr().err == ""  # once only
    assert guard(trainer, learning, False) is False
    trainer.step = 40  # still within warmup + 50 steps
    assert guard(trainer, at_chance, False) is False
    assert capsys.readouterr().err == ""


def test_a_config_sized_for_a_gpu_says_so_on_the_cpu_with_its_first_step(tiny_bert, data_root, tmp_path, capsys,
                                                                         monkeypatch):
    from training import pace

    cfg = load_config("tiny", overrides(tiny_bert, data_root, tmp_path / "small", **{"train.max_steps": 2}))
    loop.run(cfg)
    assert "sized for a GPU" not in capsys.readouterr().err
    monkeypatch.setattr(pace, "GPU_SIZED_PARAMETERS", 1000)   # the tiny model counts as the coco preset's
    cfg = load_config("tiny", overrides(tiny_bert, data_root, tmp_path / "big", **{"train.max_steps": 3}))
    loop.run(cfg)
    err = capsys.readouterr().err
    assert "sized for a GPU, and this run found only the CPU" in err
    (note,) = [line for line in err.splitlines() if line.startswith("first step:")]
    assert "the 2 steps left would take about" in note


def test_epoch_sampler_shards_and_skips():
    size, batch = 37, 4
    ranks = [list(EpochSampler(size, batch, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 * batch  # 37 // 8 = 4 batches a rank
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 32
    sampler = EpochSampler(size, batch, seed=1)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == epoch3[2 * batch:] and len(sampler) == len(epoch3) - 2 * batch
    sampler.set_epoch(4)
    assert list(sampler) != epoch3


def test_warmup_then_cosine():
    multiplier = warmup_cosine(warmup_steps=4, total_steps=20)
    assert [multiplier(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = [multiplier(s) for s in range(4, 21)]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_fp16_overflow_lowers_the_loss_scale_then_steps():
    """An overflowed step is skipped and the scale drops, so the next steps go through (CUDA's fp16 path; the
    GradScaler logic is the same on the CPU)."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    results = []
    for factor in (1e36, 1.0):   # 1e36 * 2**16 overflows float32
        assert backward((weight * factor).sum(), optimizer, scaler)
        results.append(optimizer_step(optimizer, schedule, [weight], 1.0, scaler))
    assert results == [False, True]
    assert scaler.get_scale() == 2.0 ** 15
    assert weight.detach().lt(1).all() and weight.grad is None


@pytest.mark.parametrize("tracker", ["none", "tensorboard", "wandb"])
def test_scalars_and_sample_sheets_go_to_the_tracker(tiny_bert, data_root, tmp_path, tracker, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = overrides(tiny_bert, data_root, tmp_path, **{"train.max_steps": 2, "train.epochs": 1})
    assert cli.main(cli_args(settings, "--report-to", tracker)) == 0
    run_dir = tmp_path / "embedded"
    assert (run_dir / "tensorboard").exists() == (tracker == "tensorboard")
    assert (run_dir / "wandb").exists() == (tracker == "wandb")
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
        assert {"loss", "cont", "val_loss", "step_seconds"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("loss")] == [1, 2] and "samples" in events.Tags()["images"]
    if tracker == "wandb":
        (run,) = (run_dir / "wandb").glob("offline-run-*")
        (history,) = run.glob("*.wandb")            # W&B's record log: keys are stored as plain strings
        assert all(key in history.read_bytes() for key in (b"val_loss", b"step_seconds", b"samples"))


def test_a_device_that_is_not_there_is_one_line_and_exit_2(tiny_bert, data_root, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert cli.main(cli_args(overrides(tiny_bert, data_root, tmp_path), "--device", "cuda:7")) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "cuda:7" in line
