"""``--strategy fsdp``: the model sharded with FSDP2's ``fully_shard``, and its checkpoints.

Every layer with parameters is its own FSDP unit (their weights are gathered one at a time), the
root gathers the rest. Checkpoints hold full, unsharded tensors on the CPU, like those of a DDP
or one-process run, so ``final.pt`` and ``best.pt`` serve the same tools, and a run resumes under
the same number of workers: the state is gathered to rank 0 to be written (a collective: every
worker calls) and each worker shards the full state it reads back.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .. import SharpnessAwareOptimizer

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every direct child that has parameters, then the model itself."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def gather_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict on rank 0 (CPU tensors), empty elsewhere; every worker calls."""
    return get_model_state_dict(model, options=_GATHER)


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Shard the full ``state`` (read by every worker) into ``model``."""
    set_model_state_dict(model, state, options=_SCATTER)


def gather_optimizer_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer's full state on rank 0 (keyed by parameter name), with a sharpness-aware
    optimizer's mode state (its DTensors gathered); every worker calls."""
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        return get_optimizer_state_dict(model, optimizer, options=_GATHER)
    state = get_optimizer_state_dict(model, optimizer.base_optimizer, options=_GATHER)
    return state | {"sharpness_aware": _gathered(optimizer.state_dict()["sharpness_aware"])}


def load_optimizer_state(model: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Shard the full ``state`` (read by every worker) into ``optimizer``; the mode's full
    tensors are sharded like their parameters as it loads them."""
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        set_optimizer_state_dict(model, optimizer, state, options=_SCATTER)
        return
    state = dict(state)
    mode = state.pop("sharpness_aware")
    # The helper gives a fresh optimizer state by a step at lr 0, which needs the base optimizer
    # (a sharpness-aware step needs a closure); the base then has new param groups, shared again
    # by the load below, with the mode's state.
    set_optimizer_state_dict(model, optimizer.base_optimizer, state, options=_SCATTER)
    optimizer.load_state_dict(optimizer.base_optimizer.state_dict() | {"sharpness_aware": mode})


def _gathered(value: Any) -> Any:
    """``value`` with every DTensor in it replaced by its full tensor on the CPU."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {key: _gathered(item) for key, item in value.items()}
    return value
