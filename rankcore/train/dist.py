"""Collective operations for multi-worker training, over ``torch.distributed``.

The training loop never touches ``torch.distributed`` itself: it is given a *world* object
(``None`` for a single process) with the few operations it needs. :class:`TorchDistWorld`
implements them on an initialised default process group (gloo on CPU, NCCL on GPU), which is
what Ray Train's ``TorchTrainer`` sets up on every worker.

Gradient convention of :func:`all_gather`: every rank computes the SAME loss L on the gathered
global batch; the backward pass all-reduces (sums) the incoming gradients and hands each rank
the slice of its own inputs, i.e. W · ∂L/∂x_r. DistributedDataParallel then averages the
parameter gradients over the W ranks, which gives exactly ∂L/∂θ of the single-process loss
on the global batch (tested in tests/test_train_ray.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["TorchDistWorld", "World", "all_gather"]


class World(Protocol):
    """What the training loop needs from a multi-worker setup."""

    rank: int
    world_size: int

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable concatenation along dim 0 of every rank's ``x`` (equal shapes)."""

    def all_gather_varlen(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of tensors whose first dims differ (no gradient)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model wrapped for gradient averaging (DistributedDataParallel)."""

    def barrier(self) -> None:
        """Wait for every rank."""


class _AllGather(torch.autograd.Function):
    """Forward: all-gather and concatenate; backward: all-reduce the gradient, keep own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world_size = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather over the default process group: (n, ...) -> (W·n, ...)."""
    return _AllGather.apply(x)


class TorchDistWorld:
    """A :class:`World` over the initialised default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed has no initialised process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather(x)

    def all_gather_varlen(self, x: torch.Tensor) -> torch.Tensor:
        dist = self._dist
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        param = next(model.parameters())
        if param.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[param.device.index])
        return DistributedDataParallel(model)

    def barrier(self) -> None:
        self._dist.barrier()
