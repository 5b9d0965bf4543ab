"""Loading an HF causal LM and its tokenizer from a folder, a hub id, or a built-in tiny model."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from lowmem import assets
from lowmem.errors import UserError

log = logging.getLogger("lowmem")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but torch sees no CUDA GPU (use train.device=cpu or auto)")
    return torch.device(name)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    local = assets.resolve(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as err:
        raise UserError(f"model.path '{path}': no tokenizer could be loaded ({_first_line(err)})") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked from attention and loss, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(path: str, dtype: str = "float32", device: torch.device | str = "cpu", gradient_checkpointing: bool = False,
               int8=None, seed: int = 0, shards_later: bool = False):
    """Load a causal LM in ``dtype`` on ``device``, in training mode.

    Args:
        path: local HF folder, hub id, or ``lowmem:tiny-llama``.
        dtype: float32 | bfloat16 | float16: the dtype the weights are stored and trained in (int8 weights:
            the dtype they are dequantized to for compute).
        gradient_checkpointing: recompute each layer's activations in backward instead of storing them.
        int8: a ``model.int8`` config section to store linear weights as int8 (quantized on the host, layer
            by layer, before the model moves to ``device``); None keeps float weights.
        seed: seeds the int8 weights' stochastic rounding.
        shards_later: for a model about to be sharded: when ``path`` is a distributed run's checkpoint, or a local
            folder of safetensors named as the model's weights, the weights are left on the meta device (no memory;
            buffers such as rotary frequencies are computed), for each rank to allocate and read only its rows once
            sharded (:func:`lowmem.distributed.shard.materialize`,
            :func:`lowmem.distributed.sharded_checkpoint.read_weights`). Otherwise they are loaded whole.
    """
    from transformers import AutoModelForCausalLM

    from lowmem.distributed.sharded_checkpoint import is_sharded_checkpoint, read_weights

    local = assets.resolve(path)
    if not Path(local).exists() and _looks_like_path(path):
        raise UserError(f"model.path '{path}' does not exist (a local HF folder or a hub id like org/name)")
    try:
        model = _on_meta_if_readable_by_rows(local, dtype) if shards_later else None
        meta = model is not None  # each rank reads its rows once sharded
        if not meta and is_sharded_checkpoint(local):
            model = _from_config(local, dtype)
            read_weights(model, Path(local))
        elif not meta:
            model = AutoModelForCausalLM.from_pretrained(local, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise UserError(f"model.path '{path}' could not be loaded as a causal LM ({_first_line(err)})") from None
    if int8 is not None:
        from lowmem.weights.int8 import quantize_model

        n = quantize_model(model, int8.outlier_fraction, int8.refresh_every, int8.blocksize, seed, int8.stochastic_rounding,
                           include_head=int8.include_head)
        log.info("model: %d matrix weights stored as int8 blocks of %d with %.2f%% float32 outliers (%s)",
                 n, int8.blocksize, 100 * int8.outlier_fraction,
                 "the output head included" if int8.include_head else "the output head kept in model.dtype")
    if not meta:
        model.to(device)
    model.config.use_cache = False  # the KV cache is for generation only
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    from lowmem.weights.int8 import count_weights

    n_params = count_weights(model)
    log.info("model: %s, %.2fM parameters, %s on %s", path, n_params / 1e6, dtype, device)
    return model


def _from_config(folder: str, dtype: str, parameters_on_meta: bool = False):
    """The model of ``folder``'s config.json in ``dtype``, its weights not initialized (they are read next): allocated
    in host memory, or with ``parameters_on_meta`` left on the meta device (no memory). Buffers computed from the
    config (rotary frequencies, which no checkpoint holds) are made either way."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights(), (_parameters_on_meta() if parameters_on_meta else contextlib.nullcontext()):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()  # skipped with the initialization
    return model


def _on_meta_if_readable_by_rows(folder: str, dtype: str):
    """The model of ``folder`` with its parameters on the meta device when each rank can read its rows of them from
    ``folder`` (:func:`lowmem.distributed.sharded_checkpoint.readable_by_rows`), else None."""
    from lowmem.distributed.sharded_checkpoint import readable_by_rows

    if not Path(folder).is_dir():
        return None
    model = _from_config(folder, dtype, parameters_on_meta=True)
    return model if readable_by_rows(folder, model) else None


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device as it is registered (its initialization then
    runs on meta: no memory, no time); buffers are made as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant, so frozen layers and hooks work); backward
    still reaches only the layers above the lowest trainable tensor."""
    # transformers 5 renamed the switch; older releases (still allowed by our pin) have only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings so that their output always requires grad (reentrant
    # checkpointing and PEFT need it). Non-reentrant checkpointing does not, and the hook would send backward
    # through every frozen layer: HiFT's backward must stop at its lowest active unit, and a frozen streamed unit
    # has no backward at all.
    disable = getattr(model, "disable_input_require_grads", None)
    if disable is not None:
        disable()


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix != ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
