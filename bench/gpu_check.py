"""Duet on a GPU, checked and measured in one command (about 8 minutes on one GPU). Prints one JSON object.

Sections, each in its own process and each reported even when another fails:
  env       the GPU, its memory, torch / CUDA / cuDNN and library versions
  tests     pytest -m cuda (tests/test_cuda.py)
  embedded  the embedded preset trained for --embedded-minutes: joint and phase steps per second against the CPU's,
            then the oracle's reading of its last checkpoint (bench/t2i_quality.py)
  coco256   the coco preset's model (256 px, its 42M-parameter UNet) on the embedded world drawn at 256 px for
            --coco-minutes: samples/s, peak memory, loss falling, in-batch accuracy rising
  sampling  images/s at 25 steps, batch 1 and 64, for both trained models
  serve     bench/serve_load.py against a server on the GPU

    python bench/gpu_check.py --json docs/gpu_check.json
    python bench/gpu_check.py --device cpu --quick            # the dry run: every section, shortened, on the CPU

Both worlds (and their image caches) are drawn before the runs start, alongside the tests, so each run's minutes
are spent training. Asserts nothing; a section that fails reports its error and the last lines it printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("env", "tests", "embedded", "coco256", "sampling", "serve")
COCO256 = ["data.dataset=embedded", "data.embedded_image_size=256", "data.embedded_train_images=4000",
           "data.embedded_val_images=500"]
QUICK = {"embedded": ["train.joint_steps=40", "data.embedded_train_images=2000", "data.embedded_val_images=200"],
         "coco256": ["train.batch_size=8", "data.embedded_train_images=200", "data.embedded_val_images=50",
                     "train.val_batches=1", "train.log_every_steps=1"]}
PROMPTS = ["a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top",
           "a green diamond to the left of a white cross"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run: CUDA hidden)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", default="outputs/gpu_check", help="where the runs go")
    p.add_argument("--data-root", default="data")
    p.add_argument("--json", help="also write the JSON here (rewritten after each section)")
    p.add_argument("--embedded-minutes", type=float, help="the embedded run's budget (default 3; --quick 1.5)")
    p.add_argument("--coco-minutes", type=float, help="the coco256 run's budget (default 2; --quick 1)")
    p.add_argument("--num-prompts", type=int, help="prompts the oracle reads (default 200; --quick 40)")
    p.add_argument("--serve-seconds", type=float, help="load per serving mode (default 5; --quick 3)")
    p.add_argument("--cpu-reference", default=str(ROOT / "docs" / "gpu_check_cpu.json"),
                   help="an earlier --device cpu run's JSON, whose step times the GPU's are compared with")
    p.add_argument("--quick", action="store_true", help="short runs, small worlds and batches: the dry run")
    return p.parse_args(argv)


def child_env(args) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DUET_CUDA_TESTS_ON_CPU="1")
    return env


def run(command: list[str], args, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); a timeout is exit code 124."""
    try:
        proc = subprocess.run(command, cwd=ROOT, env=child_env(args), capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (err.stdout, err.stderr)]
        return 124, *text


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_name(args, section: str) -> str:
    return f"gpu-{section}" + ("-quick" if args.quick else "")


def overrides(args, section: str, minutes: float) -> list[str]:
    base = COCO256 if section == "coco256" else []
    return [*base, *(QUICK[section] if args.quick else []), f"data.root={args.data_root}",
            f"train.out_dir={args.out}", f"train.run_name={run_name(args, section)}", f"train.max_minutes={minutes}"]


def config_name(section: str) -> str:
    return "coco" if section == "coco256" else "embedded"


def prepare_data(args) -> subprocess.Popen:
    """Draws both worlds and fills their image caches in the background (CPU work, beside the tests)."""
    code = ("import sys; from configs.loading import load_config; from data.datasets import build_datasets; "
            "from models.text_encoder import load_text_backbone\n"
            "for name, sets in ((sys.argv[1], sys.argv[3:]), ('coco', None)):\n"
            "    overrides = sets if sets is not None else sys.argv[2].split('|')\n"
            "    cfg = load_config(name, overrides); build_datasets(cfg, load_text_backbone(cfg.model.text_encoder)[1])")
    embedded, coco = overrides(args, "embedded", 1), overrides(args, "coco256", 1)
    return subprocess.Popen([sys.executable, "-c", code, "embedded", "|".join(coco), *embedded], cwd=ROOT,
                            env=child_env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def matmul_rate(device: str) -> float:
    """TFLOP/s of a large matrix product: fp32 on the CPU, bf16 on the GPU (what each trains in)."""
    import torch

    side, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    for repeat in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 5
    return round(2 * side**3 / seconds / 1e12, 3)


def env_section(args) -> dict:
    import torch

    out = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "cpu_fp32_matmul_tflops": matmul_rate("cpu"),
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "packages": {name: metadata.version(name) for name in
                        ("transformers", "diffusers", "peft", "huggingface_hub", "safetensors", "numpy")}}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        code, text, _ = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], args, 30)
        out["driver"] = text.strip() if code == 0 else None
        out["gpu_bf16_matmul_tflops"] = matmul_rate("cuda")
    return out


def tests_section(args) -> dict:
    started = time.time()
    code, text, _ = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "tests/test_cuda.py"], args, 420)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", text.strip().splitlines()[-1] if text.strip() else "")
    out = {"exit_code": code, "seconds": round(time.time() - started, 1), **{k: int(n) for n, k in summary}}
    if code != 0:
        out["failures"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
        out["tail"] = tail(text, 30)
    return out


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def pace(rows: list[dict], batch: int) -> dict | None:
    """Median seconds per step over logged rows (the first rows left out: allocator, caches, compilation)."""
    times = [r["step_seconds"] for r in rows if r.get("step_seconds")][2:]
    if not times:
        return None
    per_step = statistics.median(times)
    return {"steps": rows[-1]["step"] - rows[0]["step"] + 1, "s_per_step": round(per_step, 4),
            "steps_per_s": round(1 / per_step, 2), "samples_per_s": round(batch / per_step, 1)}


def train(args, section: str, minutes: float) -> tuple[Path, list[dict], dict]:
    """Runs main.py; (its run folder, its metrics rows, what to report)."""
    sets = overrides(args, section, minutes)
    command = [sys.executable, "main.py", "--config", config_name(section), "--overwrite", "--set", *sets]
    started = time.time()
    code, out, err = run(command, args, minutes * 60 + 300)
    text = out + err
    report = {"command": "python " + " ".join(command[1:]), "exit_code": code,
              "wall_minutes": round((time.time() - started) / 60, 2)}
    if code != 0:
        raise RuntimeError(f"main.py exited {code}:\n{tail(text)}")
    run_dir = ROOT / args.out / run_name(args, section)
    rows = read_rows(run_dir)
    val = [r for r in rows if "val_loss" in r]
    report.update(steps=max(r["step"] for r in rows), notes=[line for line in text.splitlines()
                                                             if line.startswith(("diffusion phase", "this config",
                                                                                 "first step"))][:6])
    if val:
        report["val"] = {k: round(val[-1][f"val_{k}"], 4) for k in ("loss", "i2t", "t2i")}
    memory = [r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r]
    if memory:
        report["peak_memory_gib"] = max(memory)
    return run_dir, rows, report


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / (run_dir / "latest").read_text().strip()


def embedded_section(args, results: dict) -> dict:
    from configs.loading import load_config

    run_dir, rows, report = train(args, "embedded", args.embedded_minutes)
    t = load_config("embedded", overrides(args, "embedded", 1)).train
    joint = [r for r in rows if "cont" in r]
    phase = [r for r in rows if "loss" in r and "cont" not in r]
    report["joint"] = pace(joint, t.batch_size)
    report["phase"] = pace(phase, t.diffusion_batch_size)
    reference = read_reference(args)
    for key in ("joint", "phase"):
        cpu = (reference.get(key) or {}).get("s_per_step")
        if report[key] and cpu:
            report[key].update(cpu_s_per_step=cpu, speedup=round(cpu / report[key]["s_per_step"], 1))
    checkpoint = last_checkpoint(run_dir)
    command = [sys.executable, "bench/t2i_quality.py", "--checkpoint", str(checkpoint), "--device", args.device,
               "--num-prompts", str(args.num_prompts)]
    code, out, err = run(command, args, 300)
    if code == 0:
        quality = json.loads(out.strip().splitlines()[-1])
        sweep = quality["sweep"][0]
        report["oracle"] = {"checkpoint": checkpoint.name, "prompts": quality["num_prompts"],
                            "captions": quality["captions"]["all"], "guidance": sweep["guidance"],
                            **{k: sweep[k] for k in ("single_all", "pair_all", "held_out_all", "colour", "geneval")}}
    else:
        report["oracle"] = {"error": tail(out + err)}
    results["_checkpoints"]["embedded"] = str(checkpoint)
    return report


def read_reference(args) -> dict:
    path = Path(args.cpu_reference)
    if args.device == "cpu" or not path.is_file():
        return {}
    return json.loads(path.read_text()).get("embedded", {})


def parameter_counts(checkpoint: Path) -> dict:
    """Millions of parameters in a checkpoint's UNet and in all of it, read from its safetensors headers."""
    from safetensors import safe_open

    counts = {}
    for path in checkpoint.glob("**/*.safetensors"):
        if path.parent.name == "unet_ema":
            continue
        with safe_open(path, "pt") as f:
            counts[path.parent.name] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"unet_params_m": round(counts.get("unet", 0) / 1e6, 1), "params_m": round(sum(counts.values()) / 1e6, 1)}


def coco_section(args, results: dict) -> dict:
    from configs.loading import load_config

    cfg = load_config("coco", overrides(args, "coco256", 1))
    run_dir, rows, report = train(args, "coco256", args.coco_minutes)
    sizes = parameter_counts(last_checkpoint(run_dir))
    train_rows = [r for r in rows if "cont" in r]
    report.update(model=sizes, image_size=cfg.model.image_size, batch_size=cfg.train.batch_size,
                  mixed_precision=cfg.train.mixed_precision, pace=pace(train_rows, cfg.train.batch_size))
    tenth = max(1, len(train_rows) // 10)

    def mean(key: str, part: list[dict]) -> float:
        return round(statistics.mean(r[key] for r in part), 4)

    first, last = train_rows[:tenth], train_rows[-tenth:]
    report["first_tenth"] = {k: mean(k, first) for k in ("loss", "i2t", "t2i", "diff")}
    report["last_tenth"] = {k: mean(k, last) for k in ("loss", "i2t", "t2i", "diff")}
    report["loss_falling"] = report["last_tenth"]["loss"] < report["first_tenth"]["loss"]
    report["accuracy_rising"] = all(report["last_tenth"][k] > report["first_tenth"][k] for k in ("i2t", "t2i"))
    results["_checkpoints"]["coco256"] = str(last_checkpoint(run_dir))
    return report


def sampling_section(args, results: dict) -> dict:
    import torch

    from models.checkpoint import load_checkpoint

    out = {}
    for name, checkpoint in results["_checkpoints"].items():
        model = load_checkpoint(checkpoint, args.device)
        row = {"image_size": model.config.model.image_size, "steps": 25,
               "guidance": model.config.sample.guidance_scale, "scheduler": model.config.sample.scheduler}
        for batch in (1, 64) if not args.quick else (1, 2):
            texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            times = []
            for repeat in range(3 if not args.quick else 2):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model.generate_images(texts, list(range(repeat * batch, (repeat + 1) * batch)), steps=25)
                times.append(time.perf_counter() - started)      # generate_images returns CPU tensors: synced
            seconds = statistics.median(times[1:])                 # the first call warms up
            row[f"batch_{batch}"] = {"s_per_call": round(seconds, 4), "images_per_s": float(f"{batch / seconds:.3g}")}
        out[name] = row
        del model
    return out


def serve_section(args, results: dict) -> dict:
    command = [sys.executable, "bench/serve_load.py", "--checkpoint", results["_checkpoints"]["embedded"],
               "--device", args.device, "--threads", "0", "--clients", "8", "--seconds", str(args.serve_seconds)]
    code, out, err = run(command, args, 300)
    if code != 0:
        raise RuntimeError(f"serve_load.py exited {code}:\n{tail(out + err)}")
    report = json.loads(out[out.index("{"):])
    keep = ("sent", "answered", "failed", "p50_s", "p95_s", "images_per_s", "mean_batch", "steps")
    return {"clients": report["clients"], "seconds_per_mode": report["seconds_per_mode"],
            "batched": {k: report["batched"][k] for k in keep},
            "one_at_a_time": {k: report["one_at_a_time"][k] for k in keep},
            "batching_speedup": report["batching_speedup"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, full, quick in (("embedded_minutes", 3.0, 1.5), ("coco_minutes", 2.0, 1.0), ("num_prompts", 200, 40),
                              ("serve_seconds", 5.0, 3.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    results = {"bench": "gpu_check", "device": args.device, "quick": args.quick, "_checkpoints": {},
               "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    runs = {"env": env_section, "tests": lambda a, r: tests_section(a), "embedded": embedded_section,
            "coco256": coco_section, "sampling": sampling_section, "serve": serve_section}
    preparing = prepare_data(args) if {"embedded", "coco256"} & set(wanted) else None
    for section in SECTIONS:
        if section not in wanted:
            continue
        if section in ("embedded", "coco256") and preparing is not None:
            output = preparing.communicate()[0]
            results["data_ready_s"] = round(time.time() - started, 1)
            if preparing.returncode != 0:
                results["data_error"] = tail(output)
            preparing = None
        section_started = time.time()
        try:
            results[section] = runs[section](args, results) if section != "env" else env_section(args)
        except Exception as err:   # one failed section must not lose the others' figures
            results[section] = {"error": f"{type(err).__name__}: {err}"}
        results[section]["section_s"] = round(time.time() - section_started, 1)
        print(f"[gpu_check] {section} done in {results[section]['section_s']} s", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    results["total_minutes"] = round((time.time() - started) / 60, 2)
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
