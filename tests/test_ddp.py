"""`torchrun --nproc_per_node 2` on CPU (gloo): rank 0 alone writes, and the two replicas end identical.

Run as a script (by torchrun, from the test), this file is the worker: it calls main.main() after wrapping
Trainer.fit so that each rank dumps its final weights, and gives each rank its own --out so that anything
rank 1 writes would show.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE_DIR_ENV = "DUET_TEST_STATE_DIR"
STEPS = 3


def worker_command(settings: dict[str, str], out_base: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
            str(out_base), "--config", "tiny", "--set", *[f"{k}={v}" for k, v in settings.items()]]


@pytest.mark.slow
def test_two_process_run_on_cpu(tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from configs.loading import load_config
    from data.datasets import build_datasets

    settings = {"model.text_encoder": str(tiny_bert), "data.root": str(tmp_path / "data"),
                "train.max_steps": STEPS, "train.save_every_steps": 2, "data.limit_train": 32,
                "data.caption_mode": "random"}
    # The dataset and its cache are built once here, so the ranks only read them.
    build_datasets(load_config("tiny", settings), AutoTokenizer.from_pretrained(tiny_bert))
    env = {**os.environ, STATE_DIR_ENV: str(tmp_path / "states"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    (tmp_path / "states").mkdir()
    proc = subprocess.run(worker_command(settings, tmp_path / "out"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or line.startswith("error:")]
    assert proc.returncode == 0, "\n".join(errors[-10:]) or proc.stderr[-3000:]

    run_dir = tmp_path / "out" / "rank0" / "embedded"
    assert not (tmp_path / "out" / "rank1").exists(), "rank 1 wrote files"
    assert {"checkpoint-000002", "checkpoint-000003", "best_model", "latest", "metrics.jsonl",
            "config.json"} <= {p.name for p in run_dir.iterdir()}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert proc.stdout.count("done: ") == 1 and "inf" not in proc.stdout     # rank 0 alone prints the summary

    rank0, rank1 = (load_file(tmp_path / "states" / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    # latent_scale is a running statistic each rank updates inside forward from its own batch; DDP broadcasts
    # rank 0's buffers at the next forward, so after the last step the ranks may hold slightly different values.
    differ = [k for k in rank0 if k != "latent_scale" and not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"replicas differ in {differ[:5]}"
    assert float(rank1["latent_scale"]) == pytest.approx(float(rank0["latent_scale"]), rel=0.1)
    saved = load_file(run_dir / f"checkpoint-{STEPS:06d}" / "model.safetensors")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    assert float(rank0["logit_scale"]) != pytest.approx(2.6593, abs=1e-4)  # log(1/0.07): the model trained


def _worker() -> int:
    """One torchrun rank: main.main with this rank's --out, then its final weights to $DUET_TEST_STATE_DIR."""
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    import main
    from training import loop

    original_fit = loop.Trainer.fit

    def fit_and_dump(self):
        summary = original_fit(self)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, Path(os.environ[STATE_DIR_ENV]) / f"rank{self.ctx.rank}.safetensors")
        return summary

    loop.Trainer.fit = fit_and_dump
    out_base, argv = sys.argv[1], sys.argv[2:]
    return main.main(argv + ["--out", f"{out_base}/rank{os.environ['RANK']}"])


if __name__ == "__main__":
    sys.exit(_worker())
