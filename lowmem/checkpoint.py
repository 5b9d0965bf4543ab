"""Atomic checkpoints and the final HF export.

A checkpoint folder ``checkpoint-STEP/`` is a normal HF model folder (``save_pretrained``: safetensors
weights, config, tokenizer) plus
    ``optimizer.safetensors``  the strategy's rule state (flat name → tensor),
    ``rng.safetensors``        torch CPU (and CUDA) generator states,
    ``trainer_state.json``     step, data position, Python RNG state, format version, the recipe,
    ``weights_int8.safetensors`` (int8 weights only) codes, scales, outliers and rounding-RNG states by
                               device; the HF weights beside it are their dequantized values,
    ``tokens.safetensors``     (token elimination's predictor only) each sparse layer's fitted weights,
    ``masks.safetensors``      (pruned models only) each pruned weight's sparsity mask, packed bits,
    ``adapters.safetensors``   (``update.trainable`` mask_lora / scale_lora) the adapters; the HF weights beside
                               them are the base weights, unmerged.
A distributed run's checkpoint (``lowmem.distributed.sharded_checkpoint``) holds the config, tokenizer, RNG and
trainer state the same way, but its weights and rule state as each rank's shards (``model/``, ``optimizer/``);
:func:`lowmem.model.load_model` and :func:`load_strategy_state` read either kind.
The final export (``final/``) holds the merged weights (adapters folded in, pruned entries exactly zero) and the
masks, so a later run on it keeps them.
Everything is written to a hidden temporary folder, fsynced, and renamed into place, so a crash never
leaves a half-written checkpoint that resume would pick. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowmem.weights.adapters import ADAPTERS_FILE, adapted_layers, adapter_state_dict
from lowmem.hf_folder import SHARD_BYTES, write_hf_folder
from lowmem.weights.int8 import int8_state_dict, int8_weights, load_int8_state_dict
from lowmem.weights.masks import MASKS_FILE, masks_state_dict

# 2: adds weights_int8.safetensors; 3: its rounding generators by device; 4: no generators (the rounding noise is
# counter-based, resumed from each weight's update count). Versions 1 to 3 still load.
FORMAT_VERSION = 4
STATE_FILE = "trainer_state.json"
INT8_FILE = "weights_int8.safetensors"
TOKENS_FILE = "tokens.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger("lowmem")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(write, dest: Path) -> Path:
    """Call ``write(tmp_folder)``, then atomically put the folder at ``dest`` (replacing an old one)."""
    tmp = new_temporary(dest)
    try:
        write(tmp)
        put_in_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def new_temporary(dest: Path, name: str | None = None) -> Path:
    """An empty hidden folder beside ``dest`` to write it in (``.tmp-DEST-NAME``, or a fresh random name), which
    :func:`remove_stale_temporaries` removes if the run dies before :func:`put_in_place`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        return Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    tmp = named_temporary(dest, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def named_temporary(dest: Path, name: str) -> Path:
    """The path of :func:`new_temporary`'s folder ``name`` for ``dest``."""
    return dest.parent / f".tmp-{dest.name}-{name}"


def put_in_place(tmp: Path, dest: Path) -> None:
    """fsync everything in ``tmp``, then rename it to ``dest`` (an old ``dest`` is moved aside first, then deleted)."""
    _fsync_tree(tmp)
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Clean up after a hard kill inside :func:`publish_folder`, before anything reads ``output_dir``.

    ``.tmp-NAME-*`` folders (each may hold a whole model) are deleted: a folder exists only once renamed into
    place. ``.old-NAME-PID`` is the previous ``NAME`` moved aside just before the new one was renamed in: if the
    kill fell between the two renames, ``NAME`` is missing and the old folder is put back; otherwise it is deleted.
    """
    if not output_dir.is_dir():
        return
    for child in sorted(output_dir.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith(".old-"):
            dest = output_dir / child.name[len(".old-"):].rsplit("-", 1)[0]
            if not dest.exists():
                log.warning("restoring %s from %s (a run was killed while replacing it)", dest, child)
                os.rename(child, dest)
                continue
        if child.name.startswith((".tmp-", ".old-")):
            log.info("removing %s, left by an interrupted checkpoint write", child)
            shutil.rmtree(child, ignore_errors=True)


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            states[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return states


def restore_rng(tensors: dict[str, torch.Tensor], python_state) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for key, value in tensors.items():
        if key.startswith("torch_cuda_") and torch.cuda.is_available():
            index = int(key.rsplit("_", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, index)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, strategy, trainer_state: dict, keep_last: int,
                    token_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``output_dir/checkpoint-STEP`` atomically and delete all but the newest ``keep_last``.

    ``token_state``: the token eliminator's predictor weights, if it has any."""

    def write(tmp: Path) -> None:
        settle()
        save_model(model, tmp)
        save_int8_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in strategy.state_dict().items()},
                  tmp / "optimizer.safetensors")
        save_file(rng_tensors(), tmp / rng_file())
        if token_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in token_state.items()}, tmp / TOKENS_FILE)
        save_masks(model, tmp)
        if adapted_layers(model):
            save_file(adapter_state_dict(model), tmp / ADAPTERS_FILE)
        write_trainer_state(tmp, trainer_state, step)

    path = publish_folder(write, output_dir / f"checkpoint-{step}")
    keep_newest(output_dir, keep_last)
    return path


def write_trainer_state(folder: Path, trainer_state: dict, step: int) -> None:
    """``trainer_state.json``: the trainer's state with the step, the format version and Python's RNG state. Written
    last: a folder holding it is complete (and the rename makes that atomic anyway)."""
    state = {**trainer_state, "format_version": FORMAT_VERSION, "step": step, "python_rng": list(random.getstate())}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))


def keep_newest(output_dir: Path, keep_last: int) -> None:
    """Delete all checkpoints in ``output_dir`` but the newest ``keep_last``."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    from lowmem.errors import UserError

    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"checkpoint {checkpoint} has no {STATE_FILE} (not a complete lowmem checkpoint)")
    state = json.loads(state_file.read_text())
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {checkpoint} has format version {state['format_version']}, newer than this lowmem "
            f"reads ({FORMAT_VERSION}); upgrade lowmem"
        )
    return state


def load_strategy_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The rule state, whole (a distributed run's shards read together)."""
    from lowmem.distributed.sharded_checkpoint import is_sharded_checkpoint, load_rule_state

    if is_sharded_checkpoint(checkpoint):
        return load_rule_state(checkpoint)
    path = checkpoint / "optimizer.safetensors"
    return load_file(path) if path.exists() else {}


def load_token_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / TOKENS_FILE
    return load_file(path) if path.exists() else {}


def rng_file(rank: int = 0) -> str:
    """Where a rank's generator states are saved: ``rng.safetensors`` for rank 0 (and a one-process run)."""
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"


def load_rng(checkpoint: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s generator states, or rank 0's when the checkpoint was saved by fewer processes."""
    path = checkpoint / rng_file(rank)
    return load_file(path if path.exists() else checkpoint / rng_file(0))


def export_final(output_dir: Path, model, tokenizer) -> Path:
    """``output_dir/final``: an HF folder that ``from_pretrained`` loads, written atomically."""

    def write(tmp: Path) -> None:
        settle()
        save_model(model, tmp, merge=True)
        save_masks(model, tmp)
        tokenizer.save_pretrained(tmp)

    return publish_folder(write, output_dir / "final")


def settle() -> None:
    """Wait for copies still queued on the GPU: weights and states kept in host memory are written by non-blocking
    copies (``lowmem.placement.residency``) and must have landed before they are saved."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def save_model(model, folder: Path, merge: bool = False, shard_bytes: int = SHARD_BYTES) -> None:
    """The model as an HF folder in ``folder``, shard by shard (``lowmem.hf_folder``: the model plus one matrix on its
    device, one shard in host memory); int8 weights are written dequantized, in the model's dtype. Adapters
    (``lowmem.weights.adapters``) are left out, or with ``merge`` folded into their weights (pruned entries stay
    zero)."""
    write_hf_folder(model, folder, merge, shard_bytes)


def save_masks(model, folder: Path) -> None:
    """``masks.safetensors`` when the model has sparsity masks."""
    masks = masks_state_dict(model)
    if masks:
        save_file(masks, folder / MASKS_FILE)


def save_int8_weights(model, folder: Path) -> None:
    """``weights_int8.safetensors``, the int8 weights' exact state, when the model has int8 weights (their float export
    beside it does not requantize exactly)."""
    if int8_weights(model):
        save_file(int8_state_dict(model), folder / INT8_FILE)


def load_int8_weights(checkpoint: Path, model) -> bool:
    """Restore int8 weights exactly from ``checkpoint`` if it holds them; False if it has none."""
    from lowmem.errors import UserError

    path = checkpoint / INT8_FILE
    if not path.exists():
        return False
    try:
        load_int8_state_dict(model, load_file(path))
    except ValueError as err:
        raise UserError(f"{path}: {err} (resume with the model.int8 settings it was written with)") from None
    return True
