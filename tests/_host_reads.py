"""A dispatch mode that counts host reads of tensor values (``.item()``, ``bool(t)``, ...), for
tests that a path stays free of device-to-host syncs."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.n``: the number of scalar reads."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default or func is torch.ops.aten.is_nonzero.default:
            self.n += 1
        return func(*args, **(kwargs or {}))
