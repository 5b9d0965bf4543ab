"""Checkpoints of a distributed run, sharded with ``torch.distributed.checkpoint`` (DCP): each rank writes its own rows
of the weights (``model/``) and of the rule state (``optimizer/``) into its own safetensors file
(``HuggingFaceStorageWriter``: the offsets of each shard in the file's header, JSON; nothing is pickled, and reading
opens the files with safetensors only). Rank 0 adds the config, the tokenizer and ``trainer_state.json``; every rank
its generator states. The folder is written hidden and renamed into place by rank 0 once every rank has written, so
a checkpoint is whole or absent, as in one process.

DCP reads any layout back: each rank of another number of processes reads the rows it holds now, and one process
(no process group) reads whole tensors: :func:`lowmem.model.load_model` and
:func:`lowmem.checkpoint.load_strategy_state` read such a folder as a one-process checkpoint."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowmem import checkpoint as ckpt
from lowmem.distributed.shard import local, sharded_entry, sharded_state, state_layout, whole
from lowmem.distributed.world import World
from lowmem.errors import UserError

MODEL_DIR = "model"
STATE_DIR = "optimizer"


def is_sharded_checkpoint(folder) -> bool:
    """Whether ``folder`` is a distributed run's checkpoint (weights as shards in ``model/``)."""
    return (Path(folder) / MODEL_DIR).is_dir()


def _write(tensors: dict, folder: Path) -> None:
    """Each rank's part of ``tensors`` (its local shard of a DTensor; a plain tensor, the same on every rank, once)
    into ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def _read(tensors: dict, folder: Path) -> None:
    """Fill ``tensors`` in place from the shards in ``folder``: a DTensor's local rows, a plain tensor whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    with warnings.catch_warnings():  # DCP warns that one process reads, even when told so
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist)


def _saved_entries(folder: Path) -> dict:
    """Name → DCP's metadata (whole size, dtype) of every tensor saved in ``folder``."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not folder.is_dir():
        return {}
    return HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata


def save_checkpoint(world: World, output_dir: Path, step: int, model, tokenizer, update, trainer_state: dict,
                    keep_last: int) -> Path:
    """``output_dir/checkpoint-STEP``, every rank writing its shards (a collective), atomically; all but the newest
    ``keep_last`` checkpoints deleted."""
    dest = output_dir / f"checkpoint-{step}"
    tmp = ckpt.named_temporary(dest, "sharded")  # the same folder on every rank
    if world.is_main:
        ckpt.new_temporary(dest, "sharded")
    world.barrier()
    try:
        ckpt.settle()
        _write(model.state_dict(), tmp / MODEL_DIR)
        _write(sharded_state(update.state_dict(), *state_layout(update)), tmp / STATE_DIR)
        save_file(ckpt.rng_tensors(), tmp / ckpt.rng_file(world.rank))
        world.barrier()
        if world.is_main:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            ckpt.write_trainer_state(tmp, {**trainer_state, "world_size": world.size}, step)
            ckpt.put_in_place(tmp, dest)
            ckpt.keep_newest(output_dir, keep_last)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.barrier()
    return dest


def weights_folder(path) -> Path:
    """Where the safetensors of ``path``'s weights are: a sharded checkpoint's ``model/``, or the folder itself."""
    return Path(path) / MODEL_DIR if is_sharded_checkpoint(path) else Path(path)


def _by_tensor(tensors: dict, saved) -> tuple[dict, list[str]]:
    """``tensors`` (name → tensor) with one name per tensor, a saved one (a tied weight has two names, the file one),
    and the names of the tensors none of whose names is saved."""
    names: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        names.setdefault(id(tensor), []).append(key)
    chosen, missing = {}, []
    for keys in names.values():
        found = [k for k in keys if k in saved]
        if found:
            chosen[found[0]] = tensors[found[0]]
        else:
            missing.append(keys[0])
    return chosen, missing


def readable_by_rows(path, model) -> bool:
    """Whether each rank can read its rows of ``model``'s weights from ``path``: a sharded checkpoint, or a local
    folder whose safetensors hold every weight under the model's own name and shape (``model`` may be on meta)."""
    folder = weights_folder(path)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return False
    saved = _saved_entries(folder)
    tensors = model.state_dict()
    chosen, missing = _by_tensor(tensors, saved)
    return not missing and all(tuple(saved[k].size) == tuple(t.shape) for k, t in chosen.items())


def read_weights(model, path) -> None:
    """The weights saved in ``path`` (a sharded checkpoint, or a folder of HF safetensors), into ``model`` in place:
    a sharded model's ranks each read their rows, an unsharded one reads them whole."""
    folder = weights_folder(path)
    saved = _saved_entries(folder)
    tensors, missing = _by_tensor(model.state_dict(), saved)
    if missing:
        raise UserError(f"{path} has no weight {missing[0]} (was it written for this model?)")
    for key, tensor in tensors.items():
        if tuple(saved[key].size) != tuple(tensor.shape):
            raise UserError(f"{path}: the weight {key} has shape {tuple(saved[key].size)}, the model's is "
                            f"{tuple(tensor.shape)} (was it written for this model?)")
    _read(tensors, folder)


def load_rule_state(checkpoint: Path, update=None) -> dict[str, torch.Tensor]:
    """The rule state of a sharded checkpoint (flat ``name::key`` → tensor): with ``update`` (a sharded run's), each
    entry of a sharded parameter in this rank's rows; without, every entry whole (one process)."""
    params, replicated = state_layout(update) if update is not None else ({}, ())
    templates = {}
    for key, entry in _saved_entries(Path(checkpoint) / STATE_DIR).items():
        size, dtype = tuple(entry.size), entry.properties.dtype
        param = sharded_entry(key, len(size), params, replicated)
        if param is None:
            templates[key] = torch.empty(size, dtype=dtype)
            continue
        if size[0] != param.shape[0]:
            raise UserError(f"checkpoint {checkpoint}: the state {key} has {size[0]} rows, its weight "
                            f"{param.shape[0]} (was it written for this model?)")
        rows = local(param).shape[0]
        templates[key] = whole(torch.empty((rows, *size[1:]), dtype=dtype), param)
    _read(templates, Path(checkpoint) / STATE_DIR)
    return {key: local(tensor) for key, tensor in templates.items()}
