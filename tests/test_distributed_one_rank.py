"""Parts of the FSDP2 path checked in a process group of one rank in this process (tests/test_distributed.py runs
whole trainings in two processes):
- Adafactor and AdaLomo on a row-sharded parameter (lowmem.distributed.factored), worked in row slices, against the
  one-process rule on the whole tensor: slices of a few rows (the module's slice size made tiny), odd shapes, float64,
  three steps;
- a model made with its weights on the meta device, sharded, materialized and read by rows equals the model loaded
  whole."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lowmem.distributed.factored as sharded
from float_error import UNIT_ROUNDOFF, assert_within
from lowmem.distributed.shard import materialize, shard_model
from lowmem.distributed import sharded_checkpoint
from lowmem.distributed.sharded_checkpoint import read_weights, readable_by_rows
from lowmem.model import load_model
from lowmem.rules.factored import Adafactor, AdaLomo

U64 = UNIT_ROUNDOFF[torch.float64]
STEPS = 3


@pytest.fixture
def one_rank():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


RULES = {
    "adafactor-beta1-wd": lambda: Adafactor(beta1=0.9, weight_decay=0.1, name="adafactor"),
    "adafactor-relative-step": lambda: Adafactor(relative_step=True, name="adafactor"),
    "adalomo-wd": lambda: AdaLomo(weight_decay=0.05, name="adalomo"),
}


@pytest.mark.parametrize("shape", [(37, 19), (5, 3), (1, 7), (19,)])
@pytest.mark.parametrize("rule", list(RULES))
def test_row_slices_on_a_shard_equal_the_whole_tensor_rule(one_rank, monkeypatch, rule, shape):
    """Bound: the slices only reorder float64 sums of at most n = numel terms of one sign (Σθ², Σg² by column, the row
    statistic's sum, Σupdate²): each off by ≤ (n − 1)·u relative. Each step's update is a product and quotient of
    these (square roots halve) — at most 8·n·u relative to the update's size — and θ rounds once more (u·|θ|); over
    three steps the errors add."""
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setattr(sharded, "SLICE", 64)  # 3 rows of 19 per slice: the last one partial
    torch.manual_seed(0)
    start = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(STEPS)]
    whole, rule_whole = start.clone(), RULES[rule]()
    state_whole = rule_whole.init_state(whole)
    param = distribute_tensor(start.clone(), one_rank, [Shard(0)])
    rule_sharded = RULES[rule]()
    state_sharded = rule_sharded.init_state(param.to_local())
    for g in grads:
        rule_whole.update(whole, g, state_whole, lr=1e-2)
        rule_sharded.update_sharded(param, g.clone(), state_sharded, lr=1e-2)
    n = start.numel()
    moved = (whole - start).abs().max()
    assert moved > 0
    bound = STEPS * (8 * n * U64 * moved + U64 * whole.abs())
    assert_within(param.to_local(), whole, bound, f"{rule} {shape}")
    for key, value in state_whole.items():
        if value.numel():  # a vector's column statistic is empty
            assert_within(state_sharded[key], value, STEPS * 8 * n * U64 * value.abs().max(), key)


@pytest.mark.parametrize("name", ["micro-llama", "micro-llama-tied"])
def test_a_model_read_by_rows_equals_the_model_loaded_whole(one_rank, monkeypatch, name, tmp_path):
    """The weights come from the HF folder's safetensors (a tied head: from the embedding, which the folder holds
    once), the rotary frequencies (buffers no file holds) from the config, so the sharded model computes the whole
    one's logits. Written by rows into files of a few weights each and read back, it is the same again."""
    from safetensors.torch import load_file, save_file

    from lowmem import assets

    micro_model_path = assets.resolve(f"lowmem:{name}")
    model = load_model(micro_model_path, "float64", shards_later=True)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    shard_model(model, torch.device("cpu"), one_rank)
    materialize(model, torch.device("cpu"))
    read_weights(model, micro_model_path)
    whole = load_model(micro_model_path, "float64")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(model.state_dict()[name].full_tensor(), tensor), name
    ids = torch.arange(12).reshape(2, 6) % whole.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    if name == "micro-llama-tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    monkeypatch.setattr(sharded_checkpoint, "FILE_BYTES", 200_000)  # ~4 matrices of 64 × 128 float64 per file
    sharded_checkpoint._write(*sharded_checkpoint._weight_entries(model, 1), tmp_path / "saved")
    files = list((tmp_path / "saved").glob("*.safetensors"))
    assert len(files) > 3
    assert sum(len(load_file(f)) for f in files) == len(load_file(Path(micro_model_path) / "model.safetensors"))
    again = load_model(micro_model_path, "float64", shards_later=True)
    shard_model(again, torch.device("cpu"), one_rank)
    materialize(again, torch.device("cpu"))
    read_weights(again, tmp_path / "saved")
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key].full_tensor(), tensor.full_tensor()), key

    # a folder whose names are not the model's is loaded whole instead
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (Path(micro_model_path) / f).exists():
            (renamed / f).write_bytes((Path(micro_model_path) / f).read_bytes())
    save_file({f"x.{k}": v for k, v in load_file(Path(micro_model_path) / "model.safetensors").items()},
              renamed / "model.safetensors")
    assert not readable_by_rows(renamed, whole) and readable_by_rows(micro_model_path, whole)


def test_a_rule_state_written_in_several_files_reads_back_by_rows(one_rank, monkeypatch, micro_model_path, tmp_path):
    """AdamW's moments (sharded as their weights), a row statistic and a replicated step, written in files of a few
    entries (each file a collective of its own) and read back in parts, equal what was written."""
    from types import SimpleNamespace

    monkeypatch.setattr(sharded_checkpoint, "FILE_BYTES", 100_000)
    model = load_model(micro_model_path, "float64")
    shard_model(model, torch.device("cpu"), one_rank)
    params = dict(model.named_parameters())
    torch.manual_seed(0)
    flat = {}
    for name, param in params.items():
        flat[f"{name}::exp_avg"] = torch.randn(param.to_local().shape, dtype=torch.float64)
        flat[f"{name}::exp_avg_sq_row"] = torch.rand(param.to_local().shape[:1], dtype=torch.float64)
        flat[f"{name}::step"] = torch.tensor(3.0)
    update = SimpleNamespace(strategy=SimpleNamespace(params=params), rule=SimpleNamespace(replicated_state=("step",)),
                             state_dict=lambda: flat)
    sharded_checkpoint._write(*sharded_checkpoint._rule_state_entries(update, 1),
                              tmp_path / sharded_checkpoint.STATE_DIR)
    assert len(list((tmp_path / sharded_checkpoint.STATE_DIR).glob("*.safetensors"))) > 3
    read = sharded_checkpoint.load_rule_state(tmp_path, update)
    assert read.keys() == flat.keys()
    for key, tensor in flat.items():
        assert torch.equal(read[key], tensor), key
