"""The LoRA gradients averaged over processes, in a few flat collectives.

The adapters run inside the base model's forward, not the network's, so a DDP wrapper around the network would never
see a forward to sync on: the step averages the gradients itself after its backward. Like DDP, it packs them into
size-bounded buckets (25 MiB, DDP's default) and reduces each bucket in one collective, instead of one collective per
tensor (1,444 a step for the full SDXL UNet's LoRA).

Every process must issue the same collectives, in the same order, with the same sizes: otherwise the run hangs or,
worse, one module's gradient is summed into another's of the same shape. So the buckets are fixed for the run: every
parameter that requires a gradient, in the network's parameter order, whatever the step did. A parameter without a
gradient on this process (module_dropout skipped its module: the processes draw their dropouts apart) takes part as
zeros, and whether each process had a gradient rides along in the same collective. A parameter that no process had a
gradient for keeps `.grad = None`, so the optimizer skips it exactly as with one process (AdamW would otherwise decay
it and move it by its momentum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

BUCKET_BYTES = 25 * 2**20
"""The most gradient bytes one collective carries (a larger tensor goes alone): DDP's default bucket size."""


def gradient_buckets(params: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """The indices into `params` that each collective reduces: the parameters that require a gradient, by dtype and
    device (one collective reduces one dtype), in their order, packed up to `bucket_bytes`. It depends only on the
    parameters, never on the step, so every process computes the same buckets."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, param in enumerate(params):
        if param.requires_grad:
            by_kind.setdefault((param.dtype, param.device), []).append(index)
    buckets: list[list[int]] = []
    for indices in by_kind.values():
        bucket: list[int] = []
        size = 0
        for index in indices:
            nbytes = params[index].numel() * params[index].element_size()
            if bucket and size + nbytes > bucket_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(index)
            size += nbytes
        if bucket:
            buckets.append(bucket)
    return buckets


def average_gradients(params: Sequence[torch.nn.Parameter], accelerator: Any, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Replace every gradient in `params` by its mean over the processes (one without a gradient counts as zeros;
    None everywhere stays None). `accelerator`: anything with accelerate's `num_processes` and `reduce`. Returns the
    number of collectives issued (0 with one process)."""
    processes = accelerator.num_processes
    if processes == 1:
        return 0
    buckets = gradient_buckets(params, bucket_bytes)
    for bucket in buckets:
        _average_bucket([params[index] for index in bucket], accelerator, processes)
    return len(buckets)


def _average_bucket(members: list[torch.nn.Parameter], accelerator: Any, processes: int) -> None:
    """One collective: the members' gradients flattened (zeros where missing), then one flag per member saying
    whether this process had its gradient; pre-divided by the process count before the sum, as DDP does, so fp16
    gradients overflow no sooner than their mean would."""
    sizes = [param.numel() for param in members]
    total = sum(sizes)
    first = members[0]
    flat = torch.zeros(total + len(members), dtype=first.dtype, device=first.device)
    for param, view in zip(members, flat[:total].split(sizes)):
        if param.grad is not None:
            view.copy_(param.grad.reshape(-1))
    present = [param.grad is not None for param in members]
    flat[total:] = torch.tensor(present, dtype=first.dtype).to(first.device)
    flat.div_(processes)
    flat = accelerator.reduce(flat, reduction="sum")
    grads = flat[:total].split(sizes)
    for param, grad in zip(members, grads):
        if param.grad is not None:
            param.grad.copy_(grad.view_as(param.grad))
    missing = [index for index, had in enumerate(present) if not had]
    if not missing:
        return
    # Only here does the host wait for the device: which of this process's missing gradients another process had.
    others = flat[total:][missing].tolist()
    for index, share in zip(missing, others):
        if share > 0:
            members[index].grad = grads[index].view_as(members[index]).clone()


def sync_summary(params: Sequence[torch.nn.Parameter], num_processes: int) -> dict[str, int]:
    """What the run report says about the gradient sync: the tensors and bytes averaged each optimizer step and the
    collectives that carry them (0 with one process; the step's loss mean is one more)."""
    synced = [param for param in params if param.requires_grad]
    return {
        "tensors": len(synced),
        "bytes": sum(param.numel() * param.element_size() for param in synced),
        "bucket_bytes": BUCKET_BYTES,
        "collectives_per_step": len(gradient_buckets(params)) if num_processes > 1 else 0,
    }
