"""Serve a Duet checkpoint over HTTP: AUTOMATIC1111's /sdapi/v1 API, /v1/embeddings, /health and a page at /.

    python serve.py --checkpoint outputs/embedded/best_model [--host 127.0.0.1] [--port 7860] [--api-key KEY]

The app is serving/app.py; this only parses flags, loads the model once and runs uvicorn. Ctrl-C lets the
requests in flight finish, then exits.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # weights come from the checkpoint folder, never the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs.errors import UserError  # noqa: E402
from serving.settings import API_KEY_ENV, ServeSettings  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = ServeSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under outputs/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860, help="A1111's port by default")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"every route but the page needs 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--max-batch-images", type=int, default=d.max_batch_images,
                   help="images of concurrent requests drawn in one denoising batch")
    p.add_argument("--max-queue-images", type=int, default=d.max_queue_images,
                   help="images that may wait; beyond, requests get 503 with Retry-After")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = ServeSettings(api_key=args.api_key, max_batch_images=args.max_batch_images,
                                 max_queue_images=args.max_queue_images)
        if not 0 < args.port < 65536:
            raise UserError(f"--port must be between 1 and 65535, got {args.port}")
        import torch
        import uvicorn

        from models.checkpoint import quiet_library_progress
        from pipelines.generator import ImageTextGenerator
        from serving.app import create_app

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        quiet_library_progress()
        generator = ImageTextGenerator(args.checkpoint, device=args.device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not settings.api_key:
        print(f"warning: serving on {args.host} without --api-key; anyone who can reach it may use the model",
              file=sys.stderr)
    app = create_app(generator, settings)
    print(f"serving {generator.checkpoint} on http://{args.host}:{args.port}/", file=sys.stderr)
    # timeout_graceful_shutdown=None: on Ctrl-C, wait for every request in flight (a second Ctrl-C forces it).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
