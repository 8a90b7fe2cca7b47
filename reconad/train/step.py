"""One optimisation step of the reconstruction objective (the official UniAD trainer's), in micro-batches.

``training_step`` is what ``recon-train fit`` runs per batch and what the training-parity tests compare
with the official trainer; ``micro_batch_size_for`` sizes the forward/backward passes so a step's attention
logits stay within a memory budget.
"""

import contextlib

import torch
import torch.nn.functional as F

from reconad.runtime.errors import ReconadError

ATTENTION_LOGITS_BUDGET_BYTES = 64 << 20  # per attention-logits tensor [n, nhead, L, L] of one micro-batch


def micro_batch_size_for(reconstructor: torch.nn.Module, features: torch.Tensor,
                         budget_bytes: int = ATTENTION_LOGITS_BUDGET_BYTES) -> int:
    """How many images one forward/backward pass takes so that an attention-logits tensor
    [n, nhead, L, L] (float32) stays within ``budget_bytes`` (64 MiB: 2 images at mvtec-512, whose L is
    1024 tokens; a whole batch at lite0-256, whose L is 256).

    A training step keeps a dozen such tensors for the backward pass (softmax outputs, dropout masks): at
    mvtec-512 batch 8 that is over 10 GiB, and on the 2-core reference machine a step of 8 images in one
    pass ran at a quarter of the per-image rate of passes of 2 (memory traffic and reclaim, measured by
    benchmarks/bench_train.py).
    """
    from reconad.model.transformer import Attention

    module = getattr(reconstructor, "module", reconstructor)  # DDP wraps the reconstructor
    nhead = next((m.nhead for m in module.modules() if isinstance(m, Attention)), 1)
    tokens = features.shape[-2] * features.shape[-1]
    per_image = nhead * tokens * tokens * 4
    return max(1, min(len(features), budget_bytes // per_image))


def training_step(
    reconstructor: torch.nn.Module,
    features: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float,
    parameters=None,
    jitter_noise: torch.Tensor | None = None,
    where: str = "",
    micro_batch_size: int | None = None,
) -> tuple[float, float]:
    """One optimisation step, the official UniAD trainer's: MSE between the (clean) features and the
    reconstruction of their jittered copy, backward, gradient clipping to ``grad_clip_norm``, optimizer step.

    The batch may pass forward and backward in micro-batches whose gradients add up to the whole batch's
    (gradient accumulation, each micro-batch's mean loss weighted by its share of the batch): the same
    update up to float rounding, in a fraction of the memory. What differs is only which random draws
    each image gets: dropout masks, and the jitter's coin (one per forward pass, as the official trainer
    flips it once per batch; an explicit ``jitter_noise`` is split with the batch).

    Args:
        reconstructor: in training mode (jitter and dropout on); a ``Reconstructor`` or its DDP wrapper
            (gradients are synchronised on the last micro-batch only).
        features: float32 [N, C, h, w], the frozen backbone's features (the reconstruction target).
        parameters: the parameters whose gradients are clipped; default ``reconstructor.parameters()``.
        jitter_noise: the jitter's standard-normal draw, [N, C, h, w]; None draws from torch's generator.
        where: appended to the error message (e.g. " at epoch 3").
        micro_batch_size: images per forward/backward pass; None: ``micro_batch_size_for`` (the whole
            batch when it is small).

    Returns:
        ``(loss, grad_norm)``: the batch's mean squared error and the total gradient norm before clipping.

    Raises:
        ReconadError: the loss is not finite (nothing is updated then).
    """
    chunk = micro_batch_size or micro_batch_size_for(reconstructor, features)
    starts = range(0, len(features), chunk)
    no_sync = getattr(reconstructor, "no_sync", None)  # DDP: reduce gradients once, after the last pass
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, start in enumerate(starts):
        part = features[start:start + chunk]
        noise = None if jitter_noise is None else jitter_noise[start:start + chunk]
        last = index == len(starts) - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            reconstruction = reconstructor(part, noise)
            loss = F.mse_loss(reconstruction, part)
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise ReconadError(f"The loss became {loss.item()}{where}; lower the learning rate.")
            (loss * (len(part) / len(features))).backward()
        total += loss.item() * len(part)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        reconstructor.parameters() if parameters is None else parameters, grad_clip_norm
    )
    optimizer.step()
    return total / len(features), float(grad_norm)
