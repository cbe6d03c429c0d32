"""inference.py's CLI and test_generation.py, in-process (plus one real subprocess): every mode, the files they
write, and bad input as one `error:` line with exit 2."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image

import inference
import test_generation
from configs.loading import load_config
from data.embedded import embedded_folder
from models.checkpoint import save_checkpoint
from models.duet import DuetModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tiny_bert, tmp_path_factory):
    """A tiny checkpoint whose config points at a small embedded world, and two images."""
    root = tmp_path_factory.mktemp("cli")
    from data.embedded import ensure_embedded

    ensure_embedded(root / "data", 8, 6, seed=0, workers=1)
    cfg = load_config("tiny", {"model.text_encoder": str(tiny_bert), "data.root": str(root / "data"),
                               "data.embedded_train_images": 8, "data.embedded_val_images": 6})
    torch.manual_seed(0)
    model = DuetModel.build(cfg)
    # An EMA that differs from the raw UNet, saved as training saves it (unet_ema/ with EMAModel's extra config).
    unet = model.diffusion.unet
    ema = EMAModel(unet.parameters(), decay=0.9, use_ema_warmup=True, model_cls=UNet2DConditionModel,
                   model_config=unet.config)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    checkpoint = save_checkpoint(model, root / "outputs" / "run" / "best_model", ema=ema)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(images / name)
    (images / "readme.txt").write_text("not an image, and not listed")
    return {"root": root, "checkpoint": checkpoint, "images": images}


@pytest.fixture(scope="module")
def api(workspace):
    return inference.ImageTextGenerator(workspace["checkpoint"], device="cpu")


def run_cli(capsys, *args):
    code = inference.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_t2i_writes_the_image_the_api_draws(workspace, api, capsys, tmp_path):
    out = tmp_path / "sub" / "out.png"
    code, stdout, err = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--mode", "t2i", "--text",
                                "a red circle", "--out", out, "--steps", 2, "--seed", 5)
    assert code == 0 and err == "" and str(out) in stdout
    expected = api.text_to_image("a red circle", num_inference_steps=2, seed=5)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_the_seed_guides_lines_work_as_written(workspace, capsys, tmp_path):
    """`--checkpoint outputs/best_model` is the newest run's best model; `--output` is listed in --help; a name
    that is no checkpoint names the runs there are."""
    outputs = workspace["root"] / "outputs"
    code, stdout, err = run_cli(capsys, "--checkpoint", outputs / "best_model", "--text", "a red circle",
                                "--output", tmp_path / "guide.png", "--steps", 1)
    assert code == 0 and (tmp_path / "guide.png").is_file(), err
    code, _, err = run_cli(capsys, "--checkpoint", outputs / "bestmodel", "--text", "a red circle")
    assert code == 2 and "the runs there: " in err and str(outputs / "run") in err
    with pytest.raises(SystemExit):
        inference.parse_args(["--help"])
    assert "--out OUT, --output OUT" in capsys.readouterr().out


def test_sampling_uses_the_ema_unet(workspace, api):
    from models.checkpoint import load_checkpoint

    raw = inference.ImageTextGenerator.from_model(load_checkpoint(workspace["checkpoint"], use_ema=False))
    ema_image = np.asarray(api.text_to_image("a red circle", num_inference_steps=2, seed=0), dtype=np.int16)
    raw_image = np.asarray(raw.text_to_image("a red circle", num_inference_steps=2, seed=0), dtype=np.int16)
    assert np.abs(ema_image - raw_image).mean() > 1


def test_t2i_prompt_file_and_num_images(workspace, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green cross\n")
    code, _, _ = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--text", prompts,
                         "--out", tmp_path / "p.png", "--steps", 1, "--batch-size", 2)
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("p_*.png")) == ["p_000.png", "p_001.png", "p_002.png"]
    code, _, _ = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--text", "a red circle",
                         "--num-images", 2, "--out", tmp_path / "n.png", "--steps", 1, "--guidance-scale", 1.0,
                         "--scheduler", "dpm++")
    assert code == 0 and sorted(p.name for p in tmp_path.glob("n*.png")) == ["n_000.png", "n_001.png"]


def test_i2t_single_image_prints_the_api_caption(workspace, api, capsys):
    image = workspace["images"] / "a.jpg"
    code, stdout, err = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--mode", "i2t", "--image", image,
                                "--num-beams", 2)
    assert code == 0 and err == ""
    assert stdout.strip() == api.image_to_text(image, num_beams=2)


@pytest.mark.parametrize("suffix", [None, ".csv"])
def test_i2t_folder_writes_json_or_csv(workspace, api, capsys, tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", f"caps{suffix}"] if suffix else []
    code, _, _ = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--image", workspace["images"], *extra)
    assert code == 0
    if suffix is None:
        rows = json.loads((tmp_path / "captions.json").read_text())
    else:
        rows = list(csv.DictReader(open(tmp_path / "caps.csv")))
    files = sorted(workspace["images"].glob("*.[jp][pn]g"))
    assert [r["image"] for r in rows] == [str(f) for f in files]
    assert [r["caption"] for r in rows] == api.batch_image_to_text(files)


def test_both_modes_with_one_load(workspace, capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--mode", "both", "--text",
                              "a red circle", "--image", workspace["images"] / "b.png", "--out",
                              tmp_path / "g.png", "--steps", 1)
    assert code == 0 and (tmp_path / "g.png").is_file()
    assert len(stdout.strip().splitlines()) == 2  # "wrote ..." and the caption
    # Without --image, the generated image is captioned (a round trip).
    code, stdout, _ = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--mode", "both", "--text",
                              "a blue square", "--out", tmp_path / "r.png", "--steps", 1)
    assert code == 0 and stdout.splitlines()[0] == f"wrote {tmp_path / 'r.png'}"


def test_lora_changes_the_image_and_scale_0_is_the_base(workspace, api, capsys, tmp_path):
    from models.checkpoint import load_checkpoint
    from models.lora import UNET_TARGET_MODULES, add_lora, save_lora

    model = load_checkpoint(workspace["checkpoint"])
    add_lora(model.diffusion.unet, rank=2, alpha=2, target_modules=UNET_TARGET_MODULES)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter); make it act
        for name, param in model.diffusion.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    save_lora(tmp_path / "lora", model.diffusion.unet)
    drawn = {}
    for scale in (1.0, 0.0):
        out = tmp_path / f"lora_{scale}.png"
        code, _, err = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--text", "a red circle", "--steps", 2,
                               "--seed", 0, "--lora", tmp_path / "lora", "--lora-scale", scale, "--out", out)
        assert code == 0, err
        drawn[scale] = np.asarray(Image.open(out), dtype=np.int16)
    base = np.asarray(api.text_to_image("a red circle", num_inference_steps=2, seed=0), dtype=np.int16)
    assert np.abs(drawn[0.0] - base).max() <= 1
    assert np.abs(drawn[1.0] - base).mean() > 1


def damaged_checkpoint(workspace, tmp_path, edit):
    folder = tmp_path / "ckpt"
    shutil.copytree(workspace["checkpoint"], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_INPUTS = {
    "no checkpoint": (lambda w, t: ["--text", "a red circle"], "no checkpoint found under"),
    "checkpoint folder missing": (lambda w, t: ["--checkpoint", t / "nope", "--text", "x"], "nope"),
    "other version": (lambda w, t: ["--checkpoint", damaged_checkpoint(w, t, lambda c: c.update(format_version=99)),
                                    "--text", "x"], "format 99"),
    "other config": (lambda w, t: ["--checkpoint", damaged_checkpoint(w, t, lambda c: c["model"].update(wings=2)),
                                   "--text", "x"], "model.wings"),
    "not an image": (lambda w, t: ["--checkpoint", w["checkpoint"], "--image", w["images"] / "readme.txt"],
                     "cannot read image"),
    "truncated image": (lambda w, t: ["--checkpoint", w["checkpoint"], "--image", truncated_png(t)],
                        "cannot read image"),
    "missing image": (lambda w, t: ["--checkpoint", w["checkpoint"], "--image", t / "none.png"], "does not exist"),
    "empty prompt": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "  "], "prompt is empty"),
    "steps < 1": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--steps", 0], "steps"),
    "unwritable output": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--out",
                                        blocking_file(t) / "out.png"], "cannot create the output folder"),
    "wrong output kind": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--out", t / "o.json"],
                          "captions file"),
    "missing LoRA": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--lora", t / "none"],
                     "no LoRA adapter"),
    "bad flag value": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--steps", "many"],
                       "invalid int value"),
    "unknown scheduler": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--steps", 1,
                                        "--scheduler", "plms"], "unknown scheduler"),
    "cuda absent": (lambda w, t: ["--checkpoint", w["checkpoint"], "--text", "x", "--device", "cuda"], "CUDA"),
}


def truncated_png(folder: Path) -> Path:
    path = folder / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    return path


def blocking_file(folder: Path) -> Path:
    (folder / "file").write_text("a file where a folder is needed")
    return folder / "file"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(workspace, capsys, tmp_path, monkeypatch, case):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)  # "no checkpoint": nothing under ./outputs
    make_args, expected = BAD_INPUTS[case]
    code, _, err = run_cli(capsys, *make_args(workspace, tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert expected in err


def test_long_prompt_warns_on_stderr_and_still_draws(workspace, capsys, tmp_path):
    code, _, err = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--text", "red circle " * 40,
                           "--out", tmp_path / "l.png", "--steps", 1)
    assert code == 0 and (tmp_path / "l.png").is_file()
    assert err.startswith("warning: ") and err.count("\n") == 1 and "16" in err


def test_real_process_bad_image_exits_2_with_one_line(workspace, tmp_path):
    """The one subprocess: nothing the imports or the model load print may reach stderr."""
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--checkpoint", str(workspace["checkpoint"]),
                             "--image", str(truncated_png(tmp_path))], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot read image") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_generation_report_on_the_embedded_world(workspace, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = test_generation.main(["--checkpoint", str(workspace["checkpoint"]), "--steps", "1", "--min-t2i", "0",
                                 "--min-i2t", "0", "--num-captions", "3", "--out", str(tmp_path / "samples")])
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["ok"]
    assert report["dataset"] == "embedded" and len(report["t2i"]["paths"]) == 5
    assert all(Path(p).is_file() for p in report["t2i"]["paths"])
    assert len(report["i2t"]["captions"]) == 3 and len(report["i2t"]["references"]) == 3
    # Val captions are the prompts, and both directions get oracle scores in [0, 1].
    val = json.loads((embedded_folder(workspace["root"] / "data", 8, 6, 0) / "captions_val.json").read_text())
    assert report["t2i"]["prompts"][0] in [a["caption"] for a in val["annotations"]]
    assert report["oracle"]["n"] == 6  # every val image, up to 48, is read for the thresholds
    for direction in ("t2i", "i2t"):
        assert set(report["oracle"][direction]) >= {"colour", "shape", "all"}
        assert all(0 <= v <= 1 for v in report["oracle"][direction].values())


def test_generation_fails_below_the_oracle_thresholds(workspace, capsys, tmp_path):
    """An untrained model draws nothing the oracle reads as its prompt: "ok" must not be printed for it."""
    code = test_generation.main(["--checkpoint", str(workspace["checkpoint"]), "--steps", "1", "--min-t2i", "0.9",
                                 "--out", str(tmp_path / "samples")])
    out, err = capsys.readouterr()
    assert code == 1 and not json.loads(out.strip().splitlines()[-1])["ok"]
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert any("of generated images right, below --min-t2i 90%" in line for line in problems)


def test_generation_without_the_dataset_uses_fixed_prompts(workspace, capsys, tmp_path):
    folder = damaged_checkpoint(workspace, tmp_path, lambda c: c["data"].update(root=str(tmp_path / "absent")))
    code = test_generation.main(["--checkpoint", str(folder), "--steps", "1", "--out", str(tmp_path / "s")])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(report["t2i"]["paths"]) == 5 and report["i2t"]["captions"] == []
    assert test_generation.main(["--checkpoint", str(tmp_path / "missing")]) == 2


def test_cli_never_replaces_a_file_without_overwrite(workspace, capsys, tmp_path):
    out = tmp_path / "gen.png"
    args = ("--checkpoint", workspace["checkpoint"], "--text", "a red circle", "--steps", 1, "--seed", 0,
            "--out", out)
    assert run_cli(capsys, *args)[0] == 0
    before = out.read_bytes()
    code, _, err = run_cli(capsys, *args, "--seed", 1)
    assert code == 2 and err.startswith(f"error: {out} exists; pass --overwrite") and err.count("\n") == 1
    assert out.read_bytes() == before
    assert run_cli(capsys, *args, "--seed", 1, "--overwrite")[0] == 0 and out.read_bytes() != before


def test_cli_never_writes_into_the_folder_it_reads(workspace, capsys, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(workspace["images"], folder)
    listing = sorted(p.name for p in folder.iterdir())
    code, _, err = run_cli(capsys, "--checkpoint", workspace["checkpoint"], "--image", folder,
                           "--out", folder / "captions.json")
    assert code == 2 and "inside the input folder" in err and sorted(p.name for p in folder.iterdir()) == listing
