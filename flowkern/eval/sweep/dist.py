"""Which process of a ``torchrun`` job this is: the one place flowkern reads ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``, and the process group a sweep's processes meet in (gloo on CPU, nccl on CUDA).

.. code-block:: python

    process_index(), world_size()        # 0, 1 outside torchrun
    dist = Dist("auto")                  # joins the process group under torchrun (device -> cuda:LOCAL_RANK)
    dist.barrier(); dist.broadcast(obj); dist.close()
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["process_index", "world_size", "local_index", "Dist"]


def process_index() -> int:
    """This process's index in a ``torchrun`` job (``RANK``; 0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the ``torchrun`` job (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_index() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 outside torchrun): the CUDA device it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class Dist:
    """Process index and world size under torchrun (torch.distributed), or one process.

    Attributes:
        index, world: this process's index and the number of processes.
        device: the device asked for; under torchrun with CUDA, ``cuda:<local index>``.
    """

    def __init__(self, device: str) -> None:
        self.world = world_size()
        self.index = process_index()
        self.owned = False
        self.device = device
        if self.world > 1:
            import torch
            import torch.distributed as dist

            cuda = torch.cuda.is_available() and device != "cpu"
            if cuda and device in ("auto", "cuda"):
                self.device = f"cuda:{local_index()}"
                torch.cuda.set_device(local_index())
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if cuda else "gloo")
                self.owned = True

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process (a picklable object)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
