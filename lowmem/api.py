"""The public Python API: lowmem's model loading, update (rule × strategy), loss and export for any training loop.

    import lowmem
    model = lowmem.load_model(path, dtype="bfloat16", weight_format="int8", gradient_checkpointing=True)
    update = lowmem.Update(model, rule="adalomo", strategy="fused", lr=5e-4)
    for batch in loader:                       # input_ids, attention_mask, labels (-100: not trained on)
        update.set_lr(schedule(step))
        loss = lowmem.lm_loss(model, batch)    # chunked when it pays: the full logits never exist
        update.backward(loss)                  # fused: the update runs inside backward
        update.step()                          # standard / hift: the step; fused: finishes it
    lowmem.save_pretrained(model, "out", tokenizer)

Every keyword is a recipe key (the recipe schema is the API's): ``Update(model, rule=..., lr=..., clip_grad_norm=...,
adalomo={"eps2": 1e-3}, hift={"group_size": 2}, memory={"offload_states": True})`` takes the ``update`` section's
keys directly and the other sections as dicts, and refuses a bad one with the same one-line error as a recipe
(:class:`lowmem.errors.ConfigError`, naming the recipe key). ``lowmem train`` runs on these objects.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from lowmem.config import Config, _config_from

log = logging.getLogger("lowmem")

PLACEHOLDER = "<python>"  # model.path / data.path of a config built from keywords (not read)


def config_from(**sections) -> Config:
    """A validated :class:`Config` from keyword sections (``update={...}``, ``memory={...}``, ...)."""
    raw = {name: dict(value) for name, value in sections.items() if value is not None}
    raw.setdefault("model", {}).setdefault("path", PLACEHOLDER)
    raw.setdefault("data", {}).setdefault("path", PLACEHOLDER)
    return _config_from(raw, [])


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "auto",
               gradient_checkpointing: bool = False, weight_format: str = "float", seed: int = 0, **int8):
    """A causal LM from an HF folder, hub id or ``lowmem:NAME``, in training mode on ``device`` (auto: CUDA when
    there is one). ``weight_format="int8"`` stores its linear weights as int8 blocks with float32 outliers (QFT); the
    ``model.int8`` options (``outlier_fraction``, ``refresh_every``, ``blocksize``, ``stochastic_rounding``,
    ``include_head``) are keywords. ``seed`` seeds the int8 weights' stochastic rounding. Sparsity masks saved beside
    the weights (``masks.safetensors``, by :func:`save_pretrained` or ``lowmem prune``) are attached, so an
    :class:`Update` keeps the pruned entries zero."""
    from lowmem import model as models
    from lowmem.perp.retrain import load_stored_masks

    config = config_from(model={"path": path, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
                                "weight_format": weight_format, "int8": int8})
    m = config.model
    where = models.pick_device(device) if device in ("auto", "cpu", "cuda") else torch.device(device)
    model = models.load_model(m.path, m.dtype, where, m.gradient_checkpointing,
                              m.int8 if m.weight_format == "int8" else None, seed)
    if load_stored_masks(model, m.path):
        log.info("load_model: sparsity masks attached from %s", m.path)
    return model


def load_tokenizer(path: str):
    """The tokenizer of a model folder, hub id or ``lowmem:NAME``."""
    from lowmem.model import load_tokenizer as load

    return load(path)


class Update:
    """An update rule applied by an update strategy to a model's trainable weights (``requires_grad``).

    Per optimizer step: ``set_lr(lr)`` (optional; the last lr stays), the forward and ``backward(loss)`` of each
    micro-batch (the loss already divided by the step's label tokens), then ``step()``, which returns the step's
    statistics (``grad_norm``, ``state_bytes``, ...; values may be device tensors: read them when you log). A step
    begins at its first forward with gradients (a pre-hook on the model's body; ``begin()`` says it explicitly):
    HiFT activates its group and brings its state in there. Under ``strategy="fused"`` each gradient is applied
    inside backward and freed, so there is nothing to accumulate: a second ``backward`` before ``step`` is refused.
    ``state_dict()`` / ``load_state_dict()`` hold the rule's state (flat name → tensor, safetensors-ready) and
    resume exactly.

    Arguments: ``rule`` (sgd, adamw, adafactor, adalomo, lion, lion8bit), ``strategy`` (standard, fused, hift),
    ``lr``, any other ``update`` key (``weight_decay``, ``clip_grad_norm``, ``clip_mode``, ``beta1``, ``adalomo``,
    ``trainable``: what trains, PERP's subsets, set on the model here), the ``hift``, ``memory`` and ``lora`` sections
    as dicts, ``seed`` (HiFT's random order), ``device`` (where training
    runs, when HiFT places a model loaded in host memory).
    """

    def __init__(self, model: torch.nn.Module, rule: str = "adamw", strategy: str = "standard", lr: float = 1e-5, *,
                 hift: dict | None = None, memory: dict | None = None, lora: dict | None = None, seed: int = 0,
                 device: str | torch.device | None = None, **update):
        config = config_from(update={"rule": rule, "strategy": strategy, "lr": lr, **update}, hift=hift,
                             memory=memory, lora=lora, train={"seed": seed})
        self._check_single(model)
        if config.update.trainable != "all":  # what trains (PERP): set before the strategy hooks the trainable tensors
            from lowmem.weights.adapters import select_trainable

            select_trainable(model, config.update.trainable, config.lora.rank, config.lora.alpha)
        self._setup(model, config, torch.device(device) if device is not None else None)

    @classmethod
    def from_config(cls, model: torch.nn.Module, config: Config, device: torch.device | None = None) -> Update:
        """The update a recipe describes (its ``update``, ``hift``, ``memory`` and ``train.seed``), on a model whose
        trainable subset (``update.trainable``) the caller has set already, as ``lowmem train`` does with PERP's
        masks and adapters (``lowmem.perp.retrain.prepare``)."""
        cls._check_single(model)
        self = cls.__new__(cls)
        self._setup(model, config, device)
        return self

    def _setup(self, model, config: Config, device) -> None:
        from lowmem.rules import make_rule
        from lowmem.strategies import make_strategy

        self.config = config
        self.rule = make_rule(config.update)
        self.strategy = make_strategy(config.update.strategy, model, self.rule, config.update, config, device)
        self.lr = config.update.lr
        self._begun, self._backwards = False, 0
        self.fused = config.update.strategy == "fused" or (config.update.strategy == "hift" and config.hift.fused)
        # Held weakly, as the fused strategy's gradient hooks hold it: an update dropped without remove() dies with its
        # strategy, and hooks left on the model do nothing (they would otherwise keep updating it behind a new one)
        ref = weakref.ref(self)

        def on_forward(module, args):
            update = ref()
            if update is not None:
                update._on_forward()

        body = getattr(model, "base_model", model)  # the chunked loss runs the body alone, never model(...)
        self._hook = body.register_forward_pre_hook(on_forward)
        self._model = weakref.ref(model)
        model._lowmem_update = ref

    @staticmethod
    def _check_single(model) -> None:
        from lowmem.errors import UserError

        live = getattr(model, "_lowmem_update", None)
        if live is not None and live() is not None:  # two updates' hooks would both apply every gradient
            raise UserError("Update: this model already has a lowmem Update; call its remove() first")

    def _on_forward(self) -> None:
        if torch.is_grad_enabled() and not self._begun:
            self.begin()

    @property
    def name(self) -> str:
        return f"{self.strategy.name} + {self.rule.name}"

    def set_lr(self, lr: float) -> None:
        """The learning rate of this step, if it has not begun, else of the next (the schedule is the caller's)."""
        self.lr = float(lr)

    def begin(self) -> None:
        """Begin the step at the current lr (done by the first forward with gradients when not called)."""
        if not self._begun:
            self.strategy.prepare(self.lr)
            self._begun = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; under ``fused`` this also updates the weights."""
        self.begin()
        if self._backwards and self.fused:
            from lowmem.errors import UserError

            raise UserError("Update.backward: a fused update applies each gradient inside backward and keeps none to "
                            "accumulate; call step() after each backward (or use strategy='standard')")
        self._backwards += 1
        self.strategy.backward(loss)

    def step(self) -> dict:
        """Finish the optimizer step and return its statistics."""
        self.begin()
        stats = self.strategy.step()
        self._begun, self._backwards = False, 0
        return stats

    def schedule_position(self, step: int, total_steps: int) -> tuple[int, int]:
        """Where ``step`` of ``total_steps`` is on the lr schedule: itself, except under HiFT's delayed schedule
        (every group of a cycle at the lr of the cycle's last step)."""
        schedule_step = getattr(self.strategy, "schedule_step", None)
        return schedule_step(step, total_steps) if schedule_step else (step, total_steps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.strategy.load_state_dict(state)

    def state_bytes(self) -> int:
        return self.strategy.state_bytes()

    def feed(self, host_batch: dict[str, torch.Tensor]) -> None:
        """A micro-batch's token ids in host memory, before its forward (needed by ``memory.offload_embeddings``)."""
        getattr(self.strategy, "feed", lambda batch: None)(host_batch)

    def flush(self) -> None:
        """Wait for updates still running on the host (``memory.offload_embeddings``) before reading the weights."""
        getattr(self.strategy, "flush", lambda: None)()

    def place(self, model: torch.nn.Module) -> None:
        """HiFT with ``memory.offload_frozen_weights``: put each unit where its plan keeps it."""
        self.strategy.place(model)

    def remove(self) -> None:
        """Detach from the model: the step hook and the strategy's gradient hooks (fused, or HiFT's inner fused)
        removed, so the model trains no more through this update and another may be made."""
        _detach(self._hook, self.strategy)
        model = self._model()
        if model is not None and getattr(model, "_lowmem_update", None) is not None:
            del model._lowmem_update


def _detach(hook, strategy) -> None:
    """Remove an update's step hook and its strategy's gradient hooks (fused, or HiFT's inner fused)."""
    hook.remove()
    for each in (strategy, getattr(strategy, "inner", None)):
        getattr(each, "remove_hooks", lambda: None)()


_CHUNKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over ``batch``'s label tokens (``labels`` as in HF: unshifted, -100 ignored).
    ``chunk_tokens`` as ``memory.loss_chunk_tokens`` (None: 512 positions at a time from a 32k vocabulary where the
    head can be chunked, else the plain loss; 0: plain; a head that cannot be chunked when asked is refused): chunked,
    the head and loss run a slice at a time and the full logits never exist."""
    from lowmem.activations.loss import count_label_tokens, loss_sum, resolve_chunk_tokens

    key = (chunk_tokens,)
    resolved = _CHUNKS.setdefault(model, {})
    if key not in resolved:  # probed once per model: a head that cannot be chunked is refused, or plain under auto
        resolved[key] = resolve_chunk_tokens(chunk_tokens, model)
    return loss_sum(model, batch, resolved[key]) / max(count_label_tokens(batch), 1)


def save_pretrained(model: torch.nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """``model`` (and ``tokenizer``) as an HF folder that ``from_pretrained`` loads, written atomically: int8 weights
    dequantized, adapters merged (pruned entries stay zero), pruning masks kept beside."""
    from lowmem.checkpoint import settle, publish_folder, save_masks, save_model

    def write(tmp: Path) -> None:
        settle()  # weights kept in host memory are written by copies that may still be queued
        save_model(model, tmp, merge=True)
        save_masks(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return publish_folder(write, Path(folder))


def plan(model: str, rule: str = "adamw", strategy: str = "standard", *, batch_size: int = 1, seq_len: int = 2048,
         dtype: str = "bfloat16", weight_format: str = "float", gradient_checkpointing: bool = False,
         target: str = "cuda", steps: int | None = None, memory: dict | None = None, tokens: dict | None = None,
         hift: dict | None = None, int8: dict | None = None, **update):
    """Will it fit? ``lowmem plan`` from Python: the run simulated on fake tensors (no weight is loaded), returned as
    a :class:`lowmem.planner.plan.Plan` (``device_bytes``, ``fits(budget_bytes)``, its components). ``model`` is an HF
    folder, hub id or a shipped config (``lowmem:llama-3.1-8b``)."""
    from lowmem.planner.plan import simulate

    config = config_from(model={"path": model, "dtype": dtype, "weight_format": weight_format,
                                "gradient_checkpointing": gradient_checkpointing, "int8": int8 or {}},
                         data={"path": PLACEHOLDER, "max_seq_len": seq_len}, train={"batch_size": batch_size},
                         update={"rule": rule, "strategy": strategy, **update}, memory=memory, tokens=tokens,
                         hift=hift)
    return simulate(config, steps=steps, target=target)


def prune(model: torch.nn.Module, criterion: str = "wanda", pattern: str = "unstructured", sparsity: float = 0.5,
          calibration=None, include_head: bool = False):
    """PERP's first half: prune ``model`` in place (``magnitude``: |W| per matrix; ``wanda``: |W|·‖x‖ per output row,
    from ``calibration``, an iterable of batches with ``input_ids`` and ``attention_mask``, layer by layer) to
    ``pattern`` (unstructured at ``sparsity``, ``"2:4"`` or ``"4:8"``). The masks stay on the layers, so every
    :class:`Update` afterwards keeps the pruned entries zero, and :func:`save_pretrained` keeps them. Returns the
    sparsity reached (:class:`lowmem.perp.prune.PruneReport`, read back from the weights). Options are checked as the
    recipe's ``prune`` section."""
    from lowmem.perp.prune import prune_model, sparsity_report

    p = config_from(prune={"criterion": criterion, "pattern": pattern, "include_head": include_head,
                           **({"sparsity": sparsity} if pattern == "unstructured" else {})}).prune
    return sparsity_report(model, prune_model(model, p.criterion, p.sparsity, p.pattern, p.include_head, calibration))


def eliminate_tokens(model: torch.nn.Module, keep_ratio: float = 0.4, dense_layers: int = 2, block_size: int = 64,
                     predictor: bool = False, refresh_every: int = 50, device: str | torch.device | None = None):
    """LeMo's token elimination on ``model`` (hooks on its decoder layers, nothing copied): in training mode, layers
    after the first ``dense_layers`` (the last is always dense) run only the ``keep_ratio`` most informative blocks of
    ``block_size`` tokens. Returns the eliminator: call its ``start_step(step)`` before each step's forwards (with
    ``predictor``, it refits every ``refresh_every`` steps), ``remove()`` to detach it. Options are checked as the
    recipe's ``tokens`` section."""
    from lowmem.activations.tokens import TokenEliminator

    t = config_from(tokens={"eliminate": True, "keep_ratio": keep_ratio, "dense_layers": dense_layers,
                            "block_size": block_size, "predictor": predictor, "refresh_every": refresh_every}).tokens
    where = torch.device(device) if device is not None else next(model.parameters()).device
    return TokenEliminator(model, t.keep_ratio, t.dense_layers, t.block_size, t.predictor, t.refresh_every, where)
