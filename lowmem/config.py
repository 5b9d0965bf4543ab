"""The recipe schema: dataclasses, YAML loading, ``a.b=value`` overrides typed by the schema, and
one-line errors (exit code 2 in the CLI) naming the key, the bad value and the fix."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lowmem.errors import ConfigError, did_you_mean

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]


@dataclass
class Int8WeightConfig:
    outlier_fraction: float = 0.01  # largest-magnitude values of each weight kept exactly in float32
    refresh_every: int = 100  # updates of a weight between choosing its outliers and block scales afresh; 0: never
    blocksize: int = 256  # values per float32 scale
    stochastic_rounding: bool = True  # false rounds to nearest: updates under half a code step are lost
    # the output head as int8 too (untied heads); with the chunked loss it is dequantized a slice of rows at a time
    include_head: bool = False


@dataclass
class ModelConfig:
    path: str = ""  # HF folder, hub id, or lowmem:tiny-llama (built on first use)
    dtype: DTypeName = "float32"  # float64: numerical checks only (the rules then compute in float64, without kernels)
    gradient_checkpointing: bool = False  # saves activations of every layer; costs one extra forward
    # int8: linear weights (not the output head) stored as int8 blocks + float32 outliers, no float copy (QFT)
    weight_format: Literal["float", "int8"] = "float"
    int8: Int8WeightConfig = field(default_factory=Int8WeightConfig)


@dataclass
class DataFieldsConfig:
    """The dataset's column for each field a chat format reads (for datasets that name them otherwise)."""

    instruction: str = "instruction"  # alpaca
    input: str = "input"  # alpaca (optional column)
    output: str = "output"  # alpaca
    conversations: str = "conversations"  # sharegpt
    messages: str = "messages"  # messages


@dataclass
class DataConfig:
    path: str = ""  # .json/.jsonl/.txt/.parquet/.csv/.arrow file, folder, hub id, or lowmem:pydoc (made on first use)
    format: Literal["text", "alpaca", "sharegpt", "messages"] = "text"
    max_seq_len: int = 512
    packing: Optional[bool] = None  # None: on for text, off for chat formats
    # share of data.path's rows held out for validation (drawn by train.seed); null: 0.05, or 0 with data.val_path
    val_fraction: Optional[float] = None
    val_path: Optional[str] = None  # validation rows of their own: a file, a folder or hub id (its validation split)
    split: str = "train"
    text_field: str = "text"
    # the chat formats' columns, e.g. fields.output=answer
    fields: DataFieldsConfig = field(default_factory=DataFieldsConfig)
    mask_prompt: bool = True  # prompt and user tokens are not trained on
    # read data.path lazily (files larger than memory): rows shuffled in a buffer, needs train.max_steps
    streaming: bool = False
    shuffle_buffer: int = 10000  # data.streaming: rows the shuffle draws from (1: the file's order)

    def held_out_fraction(self) -> float:
        """data.val_fraction as used: its default is 0.05 of data.path's rows, or none with data.val_path or
        data.streaming."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.val_path or self.streaming else 0.05


@dataclass
class AdafactorConfig:
    relative_step: bool = False  # rho_t = min(lr, 1/sqrt(t)) as torch.optim.Adafactor; use a constant schedule
    scale_parameter: bool = True  # step scaled by max(eps2, RMS(weight))
    beta1: Optional[float] = None  # first moment (transformers); costs 4 bytes per parameter
    clip_threshold: float = 1.0  # update clipped to this RMS
    decay_rate: float = -0.8  # beta2_t = 1 - t^decay_rate
    eps1: float = 1e-30
    eps2: float = 1e-3


@dataclass
class AdalomoConfig:
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    eps1: float = 1e-30
    eps2: float = 1e-3


@dataclass
class LionConfig:
    beta1: float = 0.9
    beta2: float = 0.99
    min_8bit_size: int = 4096  # lion8bit: smaller tensors keep float32 momentum
    quantize_embeddings: bool = False  # lion8bit: embeddings keep float32 momentum unless true


@dataclass
class LossScaleConfig:
    init_scale: float = 65536.0  # float16 only: loss multiplier, halved on overflow
    growth_interval: int = 1000  # steps without overflow before the scale doubles again
    min_scale: float = 1.0


@dataclass
class UpdateConfig:
    strategy: str = "standard"
    rule: str = "adamw"
    # what trains (PERP): all | norms (norm weights, biases) | norms+head | mask_lora | scale_lora (norms, biases and
    # an adapter on each prunable matrix; see lowmem.weights.adapters). Pruned weights keep their zeros under every
    # choice.
    trainable: Literal["all", "norms", "norms+head", "mask_lora", "scale_lora"] = "all"
    lr: float = 1e-5
    weight_decay: float = 0.0
    clip_grad_norm: Optional[float] = 1.0
    # fused only: per_tensor clips each gradient by itself (no extra pass); two_pass computes the global
    # norm with a first backward, as LOMO does (about 2x backward time)
    clip_mode: Literal["per_tensor", "two_pass"] = "per_tensor"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)
    adalomo: AdalomoConfig = field(default_factory=AdalomoConfig)
    lion: LionConfig = field(default_factory=LionConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)


@dataclass
class HiftConfig:
    group_size: int = 1  # units per group; units = embeddings, each decoder layer, final norm, lm_head
    order: Literal["bottom_up", "top_down", "random"] = "bottom_up"  # random: drawn once from train.seed
    fused: bool = False  # apply the active group's gradients inside backward (LOMO) instead of after it


@dataclass
class MemoryConfig:
    offload_states: bool = False  # hift: rule state of inactive groups in (pinned) host memory
    offload_frozen_weights: bool = False  # hift: frozen units below the active group stream in for forward
    # fused: the input embedding's update reads only the batch's rows (no vocabulary-sized gradient) where that is
    # exact (sgd, adalomo, adafactor without beta1; untied); false: always the dense gradient
    row_sparse_embeddings: bool = True
    # fused: the input embedding's weight and rule state in host memory; the batch's rows looked up and updated there
    offload_embeddings: bool = False
    # head + loss this many positions at a time, so the full logits never exist; null: 512 from a 32k vocabulary,
    # else off; 0: off
    loss_chunk_tokens: Optional[int] = None
    # check the plan (lowmem plan) before anything is allocated and refuse a run that does not fit: a size in GiB,
    # auto (the device's free memory: CUDA's free memory, or the host's available memory on CPU), or null (no check)
    budget_gb: Optional[str] = None


@dataclass
class TokensConfig:
    eliminate: bool = False  # LeMo: in the sparse layers only the most informative token blocks are computed
    keep_ratio: float = 0.4  # share of token blocks kept in each sparse layer
    dense_layers: int = 2  # the first layers that stay dense (the last one always is)
    block_size: int = 64  # tokens per block, scored and kept together
    predictor: bool = False  # estimate block scores from hidden states instead of Q·K (refitted on the exact scores)
    refresh_every: int = 50  # steps between the predictor's refits (a refit step selects by the exact scores)


@dataclass
class LoraConfig:
    rank: int = 16  # update.trainable mask_lora / scale_lora: the adapters' rank
    alpha: Optional[float] = None  # mask_lora: the adapter's product is scaled by alpha / rank (null: 2 × rank)


@dataclass
class PruneConfig:
    # none | magnitude (|W|, one threshold per matrix) | wanda (|W|·‖x‖ from calibration batches, per output row).
    # Set in a train recipe, the model is pruned before the first step (not on resume), then retrained.
    criterion: Literal["none", "magnitude", "wanda"] = "none"
    sparsity: float = 0.5  # share of each pruned matrix set to zero (unstructured only; N:M fixes it)
    # unstructured | "2:4" | "4:8" (quote it: YAML reads an unquoted 2:4 as the number 124)
    pattern: str = "unstructured"
    calibration_batches: int = 16  # wanda: training batches (train.batch_size sequences each) to measure ‖x‖ on
    include_head: bool = False  # also prune the output head (embeddings never are)


@dataclass
class TrainConfig:
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: Optional[int] = None  # overrides epochs when set
    epochs: int = 1
    seed: int = 42
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = 0.0
    eval_every_n_steps: Optional[int] = None  # None: evaluate before training and at the end only
    eval_max_batches: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class CheckpointConfig:
    output_dir: str = "outputs/run"
    save_every_n_steps: Optional[int] = None
    resume: str = "auto"  # auto | never | path of a checkpoint folder
    keep_last: int = 2  # older step checkpoints are deleted; final/ is always kept


@dataclass
class LogConfig:
    every_n_steps: int = 1
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    hift: HiftConfig = field(default_factory=HiftConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or start from defaults when ``path`` is None), apply overrides, validate."""
    return _config_from(read_yaml(Path(path)) if path is not None else {}, overrides)


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A validated copy of ``config`` with ``a.b=value`` overrides applied (``config`` is unchanged)."""
    return _config_from(config.to_dict(), overrides)


def _config_from(raw: dict[str, Any], overrides) -> Config:
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config: recipe file {path} does not exist (see `lowmem ls` for shipped recipes)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path}{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, value parsed as YAML: ``null`` → None, ``true`` → True, ``8`` → 8)."""
    if "=" not in item:
        raise ConfigError(f"config: override '{item}' must look like section.key=value (e.g. update.lr=1e-5)")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {where} must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            hint = did_you_mean(full, [f"{prefix}{n}" for n in names]) or did_you_mean_leaf(key)
            raise ConfigError(f"config: unknown key '{full}'{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(f"{prefix}{name}", raw[name], hint)
    return cls(**kwargs)


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``checkpoint.resume``."""
    cls = cls or Config
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def did_you_mean_leaf(key: str) -> str:
    """Suggest a full key for a bare or misplaced one: 'resume' → 'checkpoint.resume'."""
    leaf = key.rsplit(".", 1)[-1]
    for full in all_keys():
        if full.rsplit(".", 1)[-1] == leaf:
            return f" (did you mean '{full}'?)"
    return did_you_mean(key, all_keys())


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the schema type ``hint``; raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config: {key} {_show(value)} is not one of {', '.join(map(str, args))}{did_you_mean(value, args)}"
            )
        return value
    if value is None:
        raise ConfigError(f"config: {key} must not be null (set a {getattr(hint, '__name__', hint)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key} must be true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config: {key} must be an integer, got {_show(value)} (e.g. {key}=8)")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads 1e-5 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config: {key} must be a number, got {_show(value)} (e.g. {key}=1e-5)")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config: {key} must be a string, got {_show(value)}")
    raise TypeError(f"config: no coercion for {key} of type {hint}")


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------------------------
# Checks that span more than one value's type


def validate(config: Config) -> None:
    """Range and cross-field checks; the registries of rules and strategies name what exists."""
    from lowmem.rules import RULES
    from lowmem.strategies import STRATEGIES

    if not config.model.path:
        raise ConfigError("config: model.path is required (an HF folder, a hub id, or lowmem:tiny-llama)")
    if not config.data.path:
        raise ConfigError("config: data.path is required (a .jsonl/.json/.txt/.parquet/.csv/.arrow file, a folder, or a "
                          "hub id)")
    if config.update.rule not in RULES:
        raise ConfigError(
            f"config: update.rule '{config.update.rule}' is not known{did_you_mean(config.update.rule, RULES)}"
            f" (known: {', '.join(RULES)})"
        )
    if config.update.strategy not in STRATEGIES:
        raise ConfigError(
            f"config: update.strategy '{config.update.strategy}' is not known"
            f"{did_you_mean(config.update.strategy, STRATEGIES)} (known: {', '.join(STRATEGIES)})"
        )
    resume = config.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError(
            f"config: checkpoint.resume '{resume}' is not auto, never, or an existing checkpoint folder"
        )
    positive = {
        "data.max_seq_len": config.data.max_seq_len,
        "data.shuffle_buffer": config.data.shuffle_buffer,
        "train.batch_size": config.train.batch_size,
        "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "train.epochs": config.train.epochs,
        "log.every_n_steps": config.log.every_n_steps,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "update.lr": config.update.lr,
    }
    optional_positive = {
        "train.max_steps": config.train.max_steps,
        "train.eval_every_n_steps": config.train.eval_every_n_steps,
        "train.eval_max_batches": config.train.eval_max_batches,
        "checkpoint.save_every_n_steps": config.checkpoint.save_every_n_steps,
        "update.clip_grad_norm": config.update.clip_grad_norm,
    }
    for key, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if value <= 0:
            raise ConfigError(f"config: {key} must be positive, got {value}")
    ranges = {
        "data.val_fraction": (config.data.held_out_fraction(), 0.0, 0.9),
        "train.warmup_ratio": (config.train.warmup_ratio, 0.0, 1.0),
        "update.beta1": (config.update.beta1, 0.0, 1.0),
        "update.beta2": (config.update.beta2, 0.0, 1.0),
    }
    for key, (value, lo, hi) in ranges.items():
        if not lo <= value <= hi:
            raise ConfigError(f"config: {key} must be between {lo} and {hi}, got {value}")
    if config.data.val_path and config.data.val_fraction:
        raise ConfigError(f"config: data.val_fraction {config.data.val_fraction} and data.val_path both choose the "
                          "validation rows; set one of them (data.val_fraction=null)")
    if config.data.streaming and config.data.val_fraction:
        raise ConfigError(f"config: data.val_fraction {config.data.val_fraction} would hold out rows of a stream "
                          "read once; under data.streaming give validation rows of their own (data.val_path)")
    if config.data.streaming and config.train.max_steps is None:
        raise ConfigError("config: data.streaming does not know the stream's length, so train.epochs cannot count "
                          "steps; set train.max_steps")
    if config.update.weight_decay < 0:
        raise ConfigError(f"config: update.weight_decay must be >= 0, got {config.update.weight_decay}")
    beta1 = config.update.adafactor.beta1
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ConfigError(f"config: update.adafactor.beta1 must be in [0, 1) or null, got {beta1}")
    if config.memory.loss_chunk_tokens is not None and config.memory.loss_chunk_tokens < 0:
        raise ConfigError(f"config: memory.loss_chunk_tokens must be >= 0 (0: off, null: auto), got "
                          f"{config.memory.loss_chunk_tokens}")
    budget = config.memory.budget_gb
    if budget is not None and budget != "auto":
        try:
            ok = float(budget) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"config: memory.budget_gb must be a positive number of GiB, auto or null, got '{budget}'")
    tokens = config.tokens
    if not 0.0 < tokens.keep_ratio <= 1.0:
        raise ConfigError(f"config: tokens.keep_ratio must be in (0, 1], got {tokens.keep_ratio}")
    if tokens.refresh_every < 1:
        raise ConfigError(f"config: tokens.refresh_every must be >= 1, got {tokens.refresh_every}")
    if tokens.predictor and not tokens.eliminate:
        raise ConfigError("config: tokens.predictor predicts which blocks to keep, but tokens.eliminate is false "
                          "(set tokens.eliminate=true, or drop tokens.predictor)")
    if tokens.block_size < 1 or tokens.dense_layers < 0:
        raise ConfigError(f"config: tokens.block_size must be >= 1 and tokens.dense_layers >= 0, got "
                          f"{tokens.block_size} and {tokens.dense_layers}")
    validate_prune(config)
    if config.hift.group_size < 1:
        raise ConfigError(f"config: hift.group_size must be positive, got {config.hift.group_size}")
    if config.memory.offload_embeddings:
        rule = config.update.rule
        if config.update.strategy != "fused":
            raise ConfigError("config: memory.offload_embeddings needs update.strategy=fused (its update runs on the "
                              "host, inside backward)")
        if not config.memory.row_sparse_embeddings:
            raise ConfigError("config: memory.offload_embeddings updates the embedding's rows: it needs "
                              "memory.row_sparse_embeddings=true")
        if not getattr(RULES[rule].from_config(config.update), "row_sparse_exact", False):
            raise ConfigError(f"config: memory.offload_embeddings needs a rule whose update of the batch's rows alone "
                              f"is exact (sgd, adalomo, adafactor without beta1), not update.rule={rule}"
                              + (" with beta1" if rule == "adafactor" else ""))
    if config.update.strategy != "hift" and (config.memory.offload_states or config.memory.offload_frozen_weights):
        raise ConfigError("config: memory.offload_states and memory.offload_frozen_weights need update.strategy=hift")
    hift_fused = config.update.strategy == "hift" and config.hift.fused
    fused = config.update.strategy == "fused" or hift_fused
    if fused and config.train.gradient_accumulation_steps > 1:
        if hift_fused:
            raise ConfigError(
                "config: hift.fused applies each gradient inside backward, so train.gradient_accumulation_steps "
                "must be 1 (hift.fused=false accumulates exactly, holding only the active group's gradients)"
            )
        raise ConfigError(
            "config: update.strategy fused applies each gradient inside backward and keeps none, so "
            "train.gradient_accumulation_steps must be 1 (raise train.batch_size, or use update.strategy=standard)"
        )
    int8 = config.model.int8
    if not 0.0 <= int8.outlier_fraction < 0.5:
        raise ConfigError(f"config: model.int8.outlier_fraction must be in [0, 0.5), got {int8.outlier_fraction}")
    if int8.refresh_every < 0:
        raise ConfigError(f"config: model.int8.refresh_every must be >= 0 (0: never), got {int8.refresh_every}")
    if int8.blocksize < 1:
        raise ConfigError(f"config: model.int8.blocksize must be positive, got {int8.blocksize}")
    if fused and config.model.dtype == "float16" and config.update.clip_mode != "two_pass":
        raise ConfigError(
            "config: model.dtype float16 with fused updates needs update.clip_mode=two_pass "
            "(an overflow found mid-backward cannot undo updates already applied; or use model.dtype=bfloat16)"
        )


def _as_written(pattern: str) -> str:
    """YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 2·60 + 4 = 124: turn such a number back into the
    ``N:M`` the user wrote."""
    if pattern.isdigit() and int(pattern) >= 60:
        n, m = divmod(int(pattern), 60)
        return f"{n}:{m}"
    return pattern


def validate_prune(config: Config) -> None:
    """``prune`` and ``lora``: ranges, the N:M pattern's fixed sparsity, and knobs that would be ignored."""
    from lowmem.perp.prune import PATTERNS

    prune, lora = config.prune, config.lora
    prune.pattern = _as_written(prune.pattern)
    if prune.pattern not in PATTERNS:
        raise ConfigError(f"config: prune.pattern '{prune.pattern}' is not one of {', '.join(PATTERNS)}"
                          f"{did_you_mean(prune.pattern, PATTERNS)}")
    if not 0.0 < prune.sparsity < 1.0:
        raise ConfigError(f"config: prune.sparsity must be in (0, 1), got {prune.sparsity}")
    if prune.pattern != "unstructured" and prune.sparsity != 0.5:
        n, m = PATTERNS[prune.pattern]
        raise ConfigError(f"config: prune.pattern {prune.pattern} prunes exactly {(m - n) / m:g} of each group, so "
                          f"prune.sparsity={prune.sparsity} would be ignored (drop it, or use prune.pattern=unstructured)")
    if prune.calibration_batches < 1:
        raise ConfigError(f"config: prune.calibration_batches must be positive, got {prune.calibration_batches}")
    if lora.rank < 1:
        raise ConfigError(f"config: lora.rank must be positive, got {lora.rank}")
    if lora.alpha is not None and lora.alpha <= 0:
        raise ConfigError(f"config: lora.alpha must be positive or null, got {lora.alpha}")
    defaults = PruneConfig()
    if prune.criterion == "none":
        changed = [k for k in ("sparsity", "pattern", "calibration_batches", "include_head")
                   if getattr(prune, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"config: prune.{changed[0]} is set but prune.criterion is none, so nothing is pruned "
                              "(set prune.criterion=magnitude or wanda, or drop it)")
    if prune.criterion == "magnitude" and prune.calibration_batches != defaults.calibration_batches:
        raise ConfigError("config: prune.calibration_batches feeds wanda; magnitude pruning reads no data "
                          "(drop it, or set prune.criterion=wanda)")
    if config.update.trainable == "scale_lora" and config.update.weight_decay > 0:
        raise ConfigError("config: update.weight_decay pulls scale_lora's A and B toward 0, and with them the whole "
                          "weight W ⊙ BA (set update.weight_decay=0)")
    adapters = config.update.trainable in ("mask_lora", "scale_lora")
    if not adapters and (lora.rank != LoraConfig.rank or lora.alpha is not None):
        raise ConfigError(f"config: lora.* is set but update.trainable is {config.update.trainable}, which has no "
                          "adapters (set update.trainable=mask_lora or scale_lora, or drop lora.*)")
    if config.update.trainable != "all" and config.memory.offload_frozen_weights:
        raise ConfigError(f"config: memory.offload_frozen_weights streams HiFT's units, and with update.trainable="
                          f"{config.update.trainable} the frozen matrices belong to none, so they would stay on the "
                          "device (set memory.offload_frozen_weights=false)")
    if config.update.trainable == "scale_lora" and lora.alpha is not None:
        raise ConfigError("config: lora.alpha scales mask_lora's product; scale_lora (W ⊙ BA) has no scale "
                          "(drop lora.alpha)")
