"""A model whose parameters are views into one flat vector (as DDP's buckets are).

Pulled values land straight in the model's memory (one copy per server reply),
and the gradient goes out as one flat vector, so a training step moves each
byte once. On a GPU the flat vector lives on the device and a CPU mirror is
what the client reads and writes.

Parameters that are not float32 (a bf16 or fp16 model, say) cannot be views of the float32
vector: each keeps its own dtype and storage, is refreshed from the vector whenever new values
arrive (:meth:`host_to_device`), and its gradient goes out converted to float32. The servers'
master copy stays float32 either way.
"""

from __future__ import annotations

import torch
from torch import nn

from downpour.errors import ConfigError
from downpour.layout import Layout
from downpour.models import param_shapes
from downpour.worker.client import Pieces


class FlatModel:
    def __init__(self, model: nn.Module, layout: Layout, device: torch.device) -> None:
        shapes = param_shapes(model)
        expected = [(p.name, p.shape) for p in layout.params]
        if shapes != expected:
            raise ConfigError(f"the model's parameters {shapes[:3]}... do not match the job's layout {expected[:3]}...")
        self.model = model.to(device)
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layout = layout
        self.flat = torch.empty(layout.numel, device=device)
        self.cast: list[tuple[nn.Parameter, torch.Tensor]] = []  # (a non-float32 parameter, its slice of flat)
        self._views(copy=True)
        on_cpu = device.type == "cpu"
        self.host = self.flat if on_cpu else torch.empty(layout.numel, pin_memory=torch.cuda.is_available())
        if not on_cpu:
            self.host.copy_(self.flat)

    def _views(self, copy: bool) -> None:
        """Make the float32 parameters views of ``flat`` (``copy``: with their current values)."""
        self.cast = []
        for p, spec in zip(self.params, self.layout.params):
            view = self.flat[spec.offset : spec.offset + spec.numel]
            if copy:
                view.copy_(p.data.reshape(-1))
            if p.dtype == torch.float32:
                p.data = view.view(spec.shape)
            else:
                self.cast.append((p, view))

    def place(self, memory: torch.Tensor) -> None:
        """Move the flat vector (a CPU model's parameters) into ``memory``, a float32 CPU vector of
        its size (e.g. shared memory that servers write pulled values into); the values go along."""
        if self.device.type != "cpu" or memory.dtype != torch.float32 or memory.shape != self.flat.shape:
            raise ConfigError(f"a model's values move to a float32 CPU vector of {self.flat.numel()} values, "
                              f"not {memory.dtype} {tuple(memory.shape)} (on {self.device})")
        memory.copy_(self.flat)
        self.flat = self.host = memory
        self._views(copy=False)

    def grad_vector(self) -> torch.Tensor:
        """The gradients as one new flat CPU tensor (safe to send while the next step runs)."""
        grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=self.device)
                 for p in self.params]
        vector = torch.cat(grads)
        if not vector.is_cuda:
            return vector
        # Into page-locked memory (torch's caching host allocator reuses the blocks): a DMA copy
        # at full bus speed, where .cpu() into pageable memory is staged and several times slower.
        out = torch.empty(vector.numel(), pin_memory=True)
        out.copy_(vector, non_blocking=True)
        torch.cuda.current_stream(vector.device).synchronize()
        return out

    def grad_pieces(self) -> Pieces | torch.Tensor:
        """The gradients parameter by parameter, not concatenated (a push gathers them straight
        into its buffer: :class:`~downpour.worker.client.Pieces`); on a GPU the one vector of
        :meth:`grad_vector`. Safe to send while the next step runs: that step's backward makes
        new gradient tensors (:meth:`zero_grad` drops these)."""
        if self.device.type != "cpu":
            return self.grad_vector()
        return Pieces([p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in self.params])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def host_to_device(self) -> None:
        """After values were written into ``host``: make the model see them."""
        if self.host is not self.flat:
            self.flat.copy_(self.host, non_blocking=True)
        for p, view in self.cast:
            p.data.copy_(view.view(p.shape))
