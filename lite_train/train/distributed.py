"""torchrun's environment in, the collective operations the training loops need out (a no-op single process
otherwise): broadcast the starting state, sum gradients before a step, gather log rows, agree on stopping."""

from __future__ import annotations

import os

import torch


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Every tensor of the state (parameters and buffers) from rank 0."""
        if self.world > 1:
            for tensor in module.state_dict().values():
                self.dist.broadcast(tensor, 0)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Buffers (BN running statistics) from rank 0."""
        if self.world > 1:
            for tensor in module.buffers():
                self.dist.broadcast(tensor, 0)

    def sum_grads(self, module: torch.nn.Module) -> None:
        if self.world > 1:
            for p in module.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self.dist.all_reduce(p.grad)

    def gather_rows(self, row: list) -> list[list]:
        """Every process's row of this round, in rank order (rank 0 logs them all)."""
        if self.world == 1:
            return [row]
        rows = [None] * self.world
        self.dist.all_gather_object(rows, row)
        return rows

    def broadcast_object(self, value):
        """Rank 0's `value` on every process."""
        if self.world == 1:
            return value
        shared = [value]
        self.dist.broadcast_object_list(shared, 0)
        return shared[0]

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        self.dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()
