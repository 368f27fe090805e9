"""Guards that keep one bad batch from reaching the weights or the running statistics: `guarded_step` (skip a
non-finite loss or gradient norm), `clip_scores` (clip an absurd reward before it poisons the running std) and
`absurd_batch` (a batch whose typical score is absurd: skipped, whatever share of it is absurd)."""
from __future__ import annotations

from typing import Protocol

import torch


class Moments(Protocol):
    """What the score guards read of the running score statistics (the notebook's RunningMoments)."""
    count: int
    mean: float
    std: float


def guarded_step(optimizer, params, loss: torch.Tensor | None, max_grad_norm: float, counters: dict, scaler=None,
                 scheduler=None, reduce_grads=None) -> bool:
    """Backward + gradient-norm clip + optimizer step, unless the loss or the gradient norm is non-finite: then
    nothing reaches the weights, counters['skipped_loss'] / ['skipped_grad'] goes up by one, and the gradients
    are cleared. `scaler`: a torch.amp.GradScaler (fp16) or None; `scheduler` steps with the optimizer.
    `reduce_grads(params)` (data parallel): sums the gradients over the ranks between backward and the clip, so
    every rank clips and steps on the same gradient; a rank with no rows passes loss=None, and a non-finite loss
    on any rank makes the summed norm non-finite, so all ranks skip together. Returns True if it stepped."""
    if reduce_grads is None and not torch.isfinite(loss):
        counters["skipped_loss"] = counters.get("skipped_loss", 0) + 1
        return False
    if loss is not None:
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if reduce_grads is not None:
        reduce_grads(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(norm):
        counters["skipped_grad"] = counters.get("skipped_grad", 0) + 1
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # lowers the fp16 loss scale; a no-op when disabled
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def clip_scores(scores: torch.Tensor, c: float, stats: Moments) -> tuple[torch.Tensor, int]:
    """Outlier guard, before any score reaches the running statistics: clip each score to median ± c·s with
    s = max(1.4826·MAD of the batch, the running σ once it has data, 1.0). The median and MAD ignore one absurd
    score (1e30), so it lands within c·s of the batch's median and cannot poison σ; the floor of one score unit
    keeps a batch with no spread of its own (e.g. mostly equal scores) from clipping genuine ones. c = 0: off.
    scores [B] float32 -> (scores [B], number clipped); unchanged (the same tensor) when nothing is clipped."""
    if c <= 0 or scores.numel() == 0:
        return scores, 0
    x = scores.double()
    median = x.median()
    mad = (x - median).abs().median().item()
    spread = max(1.4826 * mad, stats.std if stats.count > 0 else 0.0, 1.0)
    clipped = x.clamp(median.item() - c * spread, median.item() + c * spread)
    n = int((clipped != x).sum())
    return (clipped.float() if n else scores), n


def absurd_batch(scores: torch.Tensor, c: float, stats: Moments) -> bool:
    """True when the batch's MEDIAN score lies more than c·max(σ, 1) from the running mean (once the running
    statistics have data): then at least half the batch is absurd (e.g. a -1e9 sentinel on 12 of 16 rows), so
    `clip_scores`, centred on that median, cannot help, and the batch must be skipped before it reaches the
    running moments. scores [B] (finite). c = 0 or no history yet: False. A genuine shift of the typical score by
    c running standard deviations within one batch (5σ by default) would also be skipped, and counted."""
    if c <= 0 or stats.count == 0 or scores.numel() == 0:
        return False
    return abs(scores.double().median().item() - stats.mean) > c * max(stats.std, 1.0)
