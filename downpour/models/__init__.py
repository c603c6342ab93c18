"""Built-in models and the model factory lookup.

``model.name: mlp`` is the reference model; ``model.factory: "pkg.mod:fn"``
calls a user function returning any ``torch.nn.Module``. ``args`` are passed
as keyword arguments either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.imports import import_object
from downpour.nn import SparseEmbedding

BUILTINS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        BUILTINS[name] = fn
        return fn

    return deco


@register_model("mlp")
def mlp(
    input_shape: tuple[int, ...] | list[int] = (28, 28),
    hidden: list[int] | tuple[int, ...] = (128,),
    dropout: float = 0.2,
    num_classes: int = 10,
) -> nn.Module:
    """Flatten -> (Linear -> ReLU -> Dropout) per hidden width -> Linear to logits.

    The default is the reference model: 784 -> 128 (ReLU, dropout 0.2) -> 10.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for d in input_shape:
        width *= int(d)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, int(num_classes)))
    return nn.Sequential(*layers)


def deep_tower(width: int, hidden, dropout: float) -> nn.Sequential:
    """Wide & Deep's deep part: Linear + ReLU (+ Dropout) per hidden width, then one logit."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class WideDeep(nn.Module):
    """Wide & Deep (Cheng et al. 2016) for CTR data: ``forward(dense [B, num_dense], ids [B, num_fields])``
    returns one logit per example.

    * wide: a learned weight per feature ID (sparse table ``wide_table``, dim 1, summed over the
      fields) plus a linear term of the dense features;
    * deep: each field's embedding (sparse table ``table``, ``dim`` floats per ID; IDs of all
      fields share one table, which is collision-free because the IDs carry their field) and
      the dense features, through an MLP.
    """

    def __init__(self, num_dense: int = 13, num_fields: int = 26, dim: int = 16, hidden: list[int] | tuple[int, ...] = (256, 128),
                 dropout: float = 0.0, table: str = "embedding", wide_table: str = "wide") -> None:
        super().__init__()
        self.num_dense, self.num_fields = int(num_dense), int(num_fields)
        self.embedding = SparseEmbedding(table, dim)
        self.wide = SparseEmbedding(wide_table, 1, mode="sum")
        self.dense_wide = nn.Linear(self.num_dense, 1)
        self.deep = deep_tower(self.num_dense + self.num_fields * int(dim), hidden, dropout)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(ids)  # [B, fields, dim]
        deep = self.deep(torch.cat([dense, emb.flatten(1)], dim=1))
        return (deep + self.wide(ids) + self.dense_wide(dense)).squeeze(-1)


@register_model("wide_deep")
def wide_deep(**kwargs) -> nn.Module:
    """The CTR model of ``examples/ctr.yaml`` (see :class:`WideDeep`)."""
    return WideDeep(**kwargs)


def model_factory(cfg: ModelConfig) -> Callable[..., nn.Module]:
    """The function that builds the job's model; its arguments (``model.args``) are checked against
    its signature, so that a misspelt one is an error before anything starts, not in the coordinator."""
    if cfg.factory is not None:
        fn = import_object(cfg.factory, "model.factory")
    else:
        fn = BUILTINS.get(cfg.name or "")
        if fn is None:
            raise ConfigError(f"model.name: unknown model {cfg.name!r}; known: {sorted(BUILTINS)}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (no signature to check against: a builtin of C, say)
        return fn
    try:
        signature.bind(**cfg.args)
    except TypeError as err:
        takes = ", ".join(p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ConfigError(f"model.args: {err} ({cfg.factory or cfg.name} takes {takes or 'none'})") from None
    return fn


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """The job's model with parameters initialised from ``seed`` (the same on every node)."""
    fn = model_factory(cfg)
    torch.manual_seed(seed)
    try:
        model = fn(**cfg.args)
    except TypeError as err:
        raise ConfigError(f"model.args: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def param_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable parameter, in the order the layout uses."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad:
            raise ConfigError(f"module {name or 'model'} ({type(m).__name__}(sparse=True)) makes sparse gradients; the servers "
                              "take dense ones: use sparse=False, or downpour.nn.SparseEmbedding for a table too large for a "
                              "worker (docs/sparse.md)")
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not p.dtype.is_floating_point:
            raise ConfigError(f"parameter {name} is {p.dtype}; Downpour trains floating-point parameters")
        out.append((name, tuple(p.shape)))
    return out
