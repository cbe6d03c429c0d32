"""Peak RAM of a training run through the diffusion phase's start, by world size and feature store: the embedded
preset on a generated world of --images training images, joint for --joint-steps, then --phase-steps phase steps.
Samples the run's private memory (USS: what it alone holds, without file pages the OS can drop, such as the image
cache's and the disk store's memory maps) and its RSS every 0.2 s. Prints one JSON object; asserts nothing.

    python bench/peak_ram.py --images 20000 --store memory
    python bench/peak_ram.py --images 60000 --store disk
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000, help="training images of the generated world")
    p.add_argument("--store", default="memory", help="train.feature_store: auto | memory | disk")
    p.add_argument("--joint-steps", type=int, default=5)
    p.add_argument("--phase-steps", type=int, default=5)
    p.add_argument("--data-root", default="data", help="where the world and the caches live")
    return p.parse_args(argv)


def watch(pid: int, peaks: dict, stop: threading.Event) -> None:
    """The highest USS and RSS of pid and its children until stop."""
    while not stop.is_set():
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            info = [p.memory_full_info() for p in procs]
        except psutil.Error:
            break
        peaks["uss"] = max(peaks.get("uss", 0), sum(i.uss for i in info))
        peaks["rss"] = max(peaks.get("rss", 0), sum(i.rss for i in info))
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        sets = [f"data.embedded_train_images={args.images}", f"data.root={args.data_root}",
                f"train.feature_store={args.store}", f"train.joint_steps={args.joint_steps}",
                f"train.max_steps={args.joint_steps + args.phase_steps}", "train.val_batches=1",
                f"train.out_dir={out}", "train.report_to=none", "train.save_every_steps=100000"]
        started = time.time()
        proc = subprocess.Popen([sys.executable, "main.py", "--set", *sets], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        peaks, stop = {}, threading.Event()
        watcher = threading.Thread(target=watch, args=(proc.pid, peaks, stop))
        watcher.start()
        stdout, stderr = proc.communicate()
        stop.set()
        watcher.join()
    note = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("diffusion phase from")]
    print(json.dumps({"images": args.images, "store": args.store, "exit_code": proc.returncode,
                      "peak_uss_gib": round(peaks.get("uss", 0) / 2**30, 2),
                      "peak_rss_gib": round(peaks.get("rss", 0) / 2**30, 2),
                      "minutes": round((time.time() - started) / 60, 2), "phase": note[:1],
                      "tail": stderr.strip().splitlines()[-1][-300:] if proc.returncode else "",
                      "load_average": [round(v, 2) for v in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
