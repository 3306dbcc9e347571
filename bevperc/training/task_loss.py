"""A model's task losses through a loss engine: how the Trainer trains the BEV detector and the gesture models.

A :class:`TaskModel` has ``forward(batch) -> outputs`` and ``loss(outputs, batch) -> (task_losses
{name: scalar}, per_sample {name: [B]})``. ``Trainer(model, loss_engine, ...)`` turns it into the
trainer's ``compute_loss`` (:class:`TaskLoss`) and takes charge of the engine (:func:`engine_hooks`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bevperc.losses.engine import LossEngine


@runtime_checkable
class TaskModel(Protocol):
    """What the trainer needs from a model it trains with a :class:`LossEngine`."""

    def __call__(self, batch: Any) -> Any:
        """The forward pass: the outputs :meth:`loss` reads."""

    def loss(self, outputs: Any, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(task_losses {name: scalar}, per_sample {name: [B]})``; names are the engine's tasks."""


class TaskLoss:
    """``compute_loss(model, batch) -> (loss, logs)`` of a :class:`TaskModel`: ``model(batch)`` (the DDP
    wrapper under torchrun), the bare model's ``loss``, then ``engine(task_losses, per_sample)``;
    each task is logged as ``task/<name>``."""

    def __init__(self, engine: LossEngine) -> None:
        self.engine = engine

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = model(batch)
        bare = model.module if isinstance(model, DistributedDataParallel) else model
        task_losses, per_sample = bare.loss(outputs, batch)
        total = self.engine(task_losses, per_sample)
        return total, {f"task/{name}": value.detach() for name, value in task_losses.items()}


def engine_hooks(engine: LossEngine, model: nn.Module, extra_state: Mapping[str, Any] | None,
                 extra_parameters: Iterable[nn.Parameter] | None,
                 after_step: Sequence[Callable[[int], None]] | None,
                 ) -> tuple[dict[str, Any], list[nn.Parameter], list[Callable[[int], None]]]:
    """The trainer's ``(extra_state, extra_parameters, after_step)`` with the engine's part first: its
    state as ``loss_engine``, its parameters, its ``step()`` (the engine's second process; under DDP
    it all-reduces its statistics itself, so every rank takes the same grouping and weight decisions)."""
    if not isinstance(model, TaskModel):
        raise TypeError(f"{type(model).__name__} has no loss(outputs, batch): a model trained with a LossEngine "
                        f"returns its task losses from it (see bevperc.training.task_loss.TaskModel)")
    extra_state = dict(extra_state or {})
    if "loss_engine" in extra_state:
        raise ValueError("extra_state['loss_engine']: the trainer checkpoints the loss engine it is given itself")
    return ({"loss_engine": engine, **extra_state}, [*engine.parameters(), *(extra_parameters or [])],
            [lambda step: engine.step(), *(after_step or [])])
