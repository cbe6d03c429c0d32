"""The options a larger model or a GPU needs, on tiny configs: gradient accumulation, gradient checkpointing (here
and, marked cuda, on the GPU) and the ResNet50 image encoder."""
import contextlib
import copy
import types

import pytest
import torch

import main as cli
from configs.loading import load_config
from models.duet import DuetModel
from training.distributed import DistributedContext
from training.phases import JointPhase

PROMPTS = ["a red circle on the left", "a large blue square", "a small yellow triangle at the top"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def tiny(tiny_bert, **extra):
    return load_config("tiny", {"model.text_encoder": str(tiny_bert), **extra})


def batch_of(model, count: int, seed: int, device="cpu", prompts=PROMPTS) -> dict:
    generator = torch.Generator().manual_seed(seed)
    texts = [prompts[i % len(prompts)] for i in range(count)]
    return {"images": (torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1).to(device),
            **model.tokenize(texts)}


def split(batch: dict, parts: int) -> list[dict]:
    size = len(batch["images"]) // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def step_gradients(model, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """The gradients JointPhase.step leaves for the optimizer, over these micro-batches."""
    trainer = types.SimpleNamespace(train_module=model, autocast=contextlib.nullcontext, scaler=None,
                                    ctx=DistributedContext(), cfg=model.config)
    phase = JointPhase(trainer, 0, 10, with_diffusion=False)
    phase.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    captured = {}

    def capture(sums):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return sums

    phase._optimizer_step = capture
    model.zero_grad(set_to_none=True)
    assert phase.step(micro_batches) is not None
    return captured


def test_accumulating_two_micro_batches_gives_the_gradients_of_one_batch(tiny_bert, monkeypatch):
    """The reconstruction and caption losses average over micro-batches as over one batch (the caption loss is a
    mean over tokens: exactly so when the micro-batches hold as many caption tokens, as here). The contrastive term
    compares each micro-batch's pairs among themselves (its negatives are the micro-batch's), so it is left out:
    2 x 4 is not 8 for it."""
    monkeypatch.setattr(DuetModel, "_track_latent_scale", lambda self, latents: None)  # a running statistic
    cfg = tiny(tiny_bert, **{"train.contrastive_weight": 0, "train.grad_accum_steps": 2})
    torch.manual_seed(0)
    model = DuetModel.build(cfg).train()
    same_length = ["a red circle on the left", "a blue square on the right"]
    whole = step_gradients(model, [batch_of(model, 8, seed=1, prompts=same_length)])
    accumulated = step_gradients(model, split(batch_of(model, 8, seed=1, prompts=same_length), 2))
    assert whole.keys() == accumulated.keys() and any(k.startswith("caption_decoder.") for k in whole)
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def losses_and_grads(model: DuetModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(3)    # the same diffusion noise and timesteps for both models
    model.zero_grad(set_to_none=True)
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_equals_plain(tiny_bert, device):
    torch.manual_seed(0)
    plain = DuetModel.build(tiny(tiny_bert, **{"model.freeze_bert": "false"})).to(device).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.diffusion.unet.is_gradient_checkpointing
    batch = batch_of(plain, 6, seed=1, device=device)
    loss_a, grads_a = losses_and_grads(plain, batch)
    loss_b, grads_b = losses_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("text_encoder.bert.") for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_resnet50_encoder_trains(tiny_bert, tmp_path):
    values = {"model.text_encoder": tiny_bert, "model.use_simple_cnn": "false", "data.root": tmp_path / "data",
              "train.out_dir": tmp_path, "train.max_steps": 2, "data.limit_train": 16, "train.val_batches": 1}
    assert cli.main(["--config", "tiny", "--set", *[f"{k}={v}" for k, v in values.items()]]) == 0
    from models.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "embedded" / "checkpoint-000002")
    assert type(model.image_encoder).__name__ == "ResNet50Encoder" and model.image_encoder.token_dim == 2048
