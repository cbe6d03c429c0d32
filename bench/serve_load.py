"""Load on serve.py over loopback: N concurrent clients send txt2img requests for a bounded time, once with request
batching and once drawing one image at a time. Counts requests sent, answered and failed (sent = answered + failed:
nothing lost), p50/p95 latency and images/s. Prints one JSON object.

    python bench/serve_load.py                               # random weights at the embedded preset's size
    python bench/serve_load.py --checkpoint outputs/embedded/best_model --clients 16 --seconds 60
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top",
           "a green diamond to the left of a white cross", "a purple circle at the bottom", "an orange cross"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="serve this checkpoint (default: random weights at --preset's size)")
    p.add_argument("--preset", default="embedded")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, each one request at a time")
    p.add_argument("--seconds", type=float, default=30, help="how long clients keep sending, per mode")
    p.add_argument("--steps", type=int, help="denoising steps per request (default: the checkpoint's)")
    p.add_argument("--max-batch-images", type=int, default=8, help="the batched mode's batch limit")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def random_checkpoint(preset: str, folder: Path) -> Path:
    """A freshly initialised model of the preset, saved: speed does not depend on what the weights learnt."""
    import torch

    from configs.loading import load_config
    from models.checkpoint import save_checkpoint
    from models.duet import DuetModel

    torch.manual_seed(0)
    return save_checkpoint(DuetModel.build(load_config(preset)), folder / "bench" / "best_model")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, args: argparse.Namespace, max_batch_images: int, log_path: Path):
    """serve.py in its own process (its model thread must not share a GIL with the clients); waits for /health."""
    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port),
                                 "--device", args.device, "--threads", str(args.threads), "--max-batch-images",
                                 str(max_batch_images), "--max-queue-images", str(max(64, 4 * args.clients))],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "DUET_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"serve.py did not start:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)


def client(url: str, index: int, stop_at: float, steps: int | None, results: list) -> None:
    """Sends requests one after another until stop_at; the request in flight then finishes (bounded time)."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        i = 0
        while time.time() < stop_at:
            body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], "seed": index * 100_000 + i}
            if steps:
                body["steps"] = steps
            started = time.perf_counter()
            try:
                response = http.post("/sdapi/v1/txt2img", json=body)
                ok = response.status_code == 200 and len(response.json()["images"]) == 1
                status = response.status_code
            except httpx.HTTPError as err:
                ok, status = False, type(err).__name__
            results.append({"ok": ok, "status": status, "seconds": time.perf_counter() - started})
            i += 1


def load(url: str, args: argparse.Namespace) -> dict:
    import httpx

    per_client: list[list] = [[] for _ in range(args.clients)]
    started = time.perf_counter()
    stop_at = time.time() + args.seconds
    threads = [threading.Thread(target=client, args=(url, i, stop_at, args.steps, per_client[i]))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    answered = [r for r in results if r["ok"]]
    latencies = sorted(r["seconds"] for r in answered)
    health = httpx.get(url + "/health", timeout=30).json()
    return {
        "sent": len(results), "answered": len(answered), "failed": len(results) - len(answered),
        "failures": sorted({str(r["status"]) for r in results if not r["ok"]}),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 3) if latencies else None,
        "images_per_s": round(len(answered) / elapsed, 2), "wall_s": round(elapsed, 1),
        "server_batches": health["batches"], "server_images": health["images"],
        "mean_batch": round(health["images"] / max(1, health["batches"]), 2), "largest_batch": health["largest_batch"],
        "steps": health["sample"]["steps"] if not args.steps else args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.preset, Path(tmp))
        modes = {}
        for mode, max_batch in (("batched", args.max_batch_images), ("one_at_a_time", 1)):
            proc, url = start_server(checkpoint, args, max_batch, Path(tmp) / f"{mode}.log")
            try:
                modes[mode] = {"max_batch_images": max_batch, **load(url, args)}
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    out = {
        "bench": "serve_load", "checkpoint": args.checkpoint or f"random weights, preset {args.preset}",
        "clients": args.clients, "seconds_per_mode": args.seconds, "server_threads": args.threads,
        "device": args.device, "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2), **modes,
        "batching_speedup": round(modes["batched"]["images_per_s"] / max(1e-9, modes["one_at_a_time"]["images_per_s"]),
                                  2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
