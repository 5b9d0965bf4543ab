"""Update rules: the per-tensor math and its state, usable by every strategy.

A rule is an object with
    ``init_state(param, name) -> dict[str, Tensor]``: the state for one tensor (may be empty; ``name``
    lets a rule treat e.g. embeddings differently), and
    ``update(param, grad, state, lr, grad_scale=1.0) -> None``: apply one step in place, under
    ``torch.no_grad``, to the gradient ``grad_scale · grad`` (the scale folds loss-scale unscaling and a
    clipping coefficient into the rule's own pass, so no scaled copy of the gradient is made). ``grad_scale``
    is a number or a 0-d float32 tensor on the parameter's device (a clipping coefficient computed there).
On a parameter sharded by FSDP2 (``lowmem.distributed``) an element-wise rule runs ``init_state`` and ``update`` on
the local shard; a rule may instead give ``init_state_sharded(param, name)`` (lion8bit: its blocks laid out by rows)
and ``update_sharded(param, grad, state, lr, grad_scale)`` (Adafactor, AdaLomo: statistics summed over the ranks).
A state entry with the parameter's rows first is sharded as the parameter; the rule's ``replicated_state`` keys are
the same on every rank.
State tensors live in the strategy's state dict, which checkpoints as safetensors; the per-tensor step
count is ``state["step"]`` (a float32 scalar tensor on the parameter's device) so it checkpoints with the rest.
A rule never reads a tensor's value on the host: on a GPU every such read waits for the device, once per
tensor, inside backward under ``fused`` (see ``lowmem.placement.host_sync``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lowmem.rules.adamw import AdamW
from lowmem.rules.factored import Adafactor, AdaLomo
from lowmem.rules.lion import Lion
from lowmem.rules.sgd import SGD


class Rule(Protocol):
    name: str

    def init_state(self, param: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]: ...

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor = 1.0) -> None: ...


RULES = {"sgd": SGD, "adamw": AdamW, "adafactor": Adafactor, "adalomo": AdaLomo, "lion": Lion, "lion8bit": Lion}


def make_rule(update_config) -> Rule:
    """Build the rule named by ``update.rule`` from the recipe's ``update`` section."""
    cls = RULES[update_config.rule]
    return cls.from_config(update_config)
