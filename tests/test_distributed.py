"""Several processes on FSDP2 (gloo, CPU): a 2-process run equals the plain 1-process run with the same global batch,
loss for loss and weight for weight (float64: the same math summed in another order, bounded in float_error.py);
checkpoints resume on another number of processes; the plan of a rank counts what the run holds; what is not
supported yet is refused in one line; a rank that fails stops the others.

The 2-process runs share one pair of processes (``distributed_runs.py``, started once by the module's fixture): a
start-up costs more than a run of the micro model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from float_error import RUN64_ADAM_EPS, RUN64_LOSS_RTOL, assert_same_run64
from lowmem import assets
from lowmem.config import load_config
from lowmem.errors import UserError
from lowmem.trainer import train

TESTS = Path(__file__).resolve().parent
COMMON = ["model.dtype=float64", *RUN64_ADAM_EPS, "train.device=cpu", "train.max_steps=4"]
FUSED = "update.strategy=fused"
WIDE = "model.path=lowmem:micro-llama-wide"
TIED = "model.path=lowmem:micro-llama-tied"
SAVE_AT_2 = "checkpoint.save_every_n_steps=2"
# strategy × rule on shards: element-wise rules (standard, with accumulation), factored ones with their statistics
# summed over the ranks (Adafactor with its first moment; fused AdaLomo with per-tensor clipping), two-pass clipping,
# HiFT (standard and fused inside), a streamed run, and the chunked loss
CASES = {
    "adamw": ["update.rule=adamw", "train.gradient_accumulation_steps=2"],
    "lion": ["update.rule=lion", "update.lr=3e-4"],
    "adafactor": ["update.rule=adafactor", "update.adafactor.beta1=0.9", "update.lr=1e-2"],
    "fused-adalomo": [FUSED, "update.rule=adalomo", "update.lr=1e-2"],
    "fused-sgd-two-pass": [FUSED, "update.rule=sgd", "update.lr=0.3", "update.clip_mode=two_pass"],
    "hift": ["update.strategy=hift", "hift.group_size=2", "update.rule=adamw"],
    # HiFT's inactive groups' states in host memory: each rank's shards of them
    "hift-offload-states": ["update.strategy=hift", "hift.group_size=2", "update.rule=adamw",
                            "memory.offload_states=true"],
    "hift-fused-adalomo": ["update.strategy=hift", "hift.group_size=2", "hift.fused=true", "update.rule=adalomo",
                           "update.lr=1e-2"],
    "streaming": ["data.streaming=true", "data.val_fraction=null", "data.shuffle_buffer=8"],
    # the chunked loss: body and head run inside the root's hooks, the head's gradient summed over 6 chunks, reduced once
    "chunked-adamw": ["update.rule=adamw", "memory.loss_chunk_tokens=16"],
    "chunked-fused-adalomo": [FUSED, "update.rule=adalomo", "update.lr=1e-2", "memory.loss_chunk_tokens=16"],
    # 8-bit momentum in blocks of 256 along each shard's rows: one process's blocks, on a model whose rows are whole
    # blocks (every weight matrix and the head quantized; norms and the embedding keep float32)
    "fused-lion8bit": [WIDE, FUSED, "update.rule=lion8bit", "update.lr=3e-4"],
    # a tied head (one weight, in the root's unit), checkpointed: read back whole by one process below
    "tied": [TIED, "update.rule=adamw", SAVE_AT_2],
}
RESUMED = {"adamw": ["update.rule=adamw"],
           "adafactor": ["update.rule=adafactor", "update.adafactor.beta1=0.9", "update.lr=1e-2"]}
# resumed from a 2-process checkpoint only (a one-process lion8bit checkpoint does not resume sharded)
RESUMED_SHARDED = {"lion8bit": [WIDE, "update.rule=lion8bit", "update.lr=3e-4"]}
STATE_KEY = {"adamw": "exp_avg", "adafactor": "exp_avg", "lion8bit": "exp_avg_codes"}


def write_recipe(folder: Path, model_path: str, data_path: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        f"model: {{path: {model_path}}}\n"
        f"data: {{path: {data_path}, max_seq_len: 48, val_fraction: 0.1}}\n"
        "update: {rule: adamw, lr: 3.0e-3, weight_decay: 0.01, clip_grad_norm: 1.0}\n"
        "train: {batch_size: 4, lr_schedule: cosine, warmup_ratio: 0.25, seed: 7, eval_every_n_steps: 2}\n"
        "log: {progress: false}\n"
    )
    return path


def overrides(out: Path, nproc: int, *extra: str) -> list[str]:
    """The recipe's overrides for a run into ``out`` on ``nproc`` processes with the global micro-batch 4."""
    return [*COMMON, f"checkpoint.output_dir={out}", f"train.batch_size={4 // nproc}", *extra]


def one_process(recipe: Path, out: Path, *extra: str):
    return train(load_config(recipe, overrides(out, 1, *extra)))


def launch_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def two_processes(runs: list[tuple[Path, Path, list[str]]], folder: Path) -> None:
    """``(recipe, out, extra overrides)`` runs, in order, in one pair of processes."""
    spec = folder / "runs.json"
    spec.write_text(json.dumps([[str(recipe), overrides(out, 2, *extra)] for recipe, out, extra in runs]))
    done = subprocess.run([sys.executable, "-c", "from lowmem.distributed.launch import launch; "
                           f"launch(2, ['{spec}'], module='distributed_runs')"],
                          capture_output=True, text=True, env=launch_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_model_path, text_data):
    """Every 2-process run of this module. Resumes: each rule's 1-process run saved at step 2 (its checkpoint-4 and
    final removed, the final kept aside) resumes in 2 processes; a 2-process run saved at step 2 (kept aside whole) is
    left for the 1-process resume of its test, and its checkpoint-2 resumes in 2 processes into another folder."""
    folder = tmp_path_factory.mktemp("distributed")
    recipe = write_recipe(folder, micro_model_path, text_data)
    for name in ("micro-llama-wide", "micro-llama-tied"):  # made here once, not by two ranks at a time
        assets.resolve(f"lowmem:{name}")
    batch = [(recipe, folder / f"two-{name}", extra) for name, extra in CASES.items()]
    for name, extra in {**RESUMED, **RESUMED_SHARDED}.items():
        if name in RESUMED:
            out = folder / f"resume-1to2-{name}"
            one_process(recipe, out, *extra, SAVE_AT_2)
            shutil.copytree(out, folder / f"whole-1-{name}")
            shutil.rmtree(out / "checkpoint-4")
            shutil.rmtree(out / "final")
            batch.append((recipe, out, [*extra, SAVE_AT_2]))
        two = folder / f"resume-2to1-{name}"
        batch += [(recipe, two, [*extra, SAVE_AT_2]),
                  (recipe, folder / f"resume-2to2-{name}", [*extra, f"checkpoint.resume={two / 'checkpoint-2'}"])]
    two_processes(batch, folder)
    for name in {**RESUMED, **RESUMED_SHARDED}:
        shutil.copytree(folder / f"resume-2to1-{name}", folder / f"whole-2-{name}")
    return folder, recipe


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert_same_run64(wa[key], wb[key], key)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_as_one_with_the_same_global_batch(runs, case, micro_model_path):
    """Each strategy × rule on shards against the plain one-process run; the export is gathered to rank 0."""
    folder, recipe = runs
    one = one_process(recipe, folder / f"one-{case}", *CASES[case])
    two = folder / f"two-{case}"
    assert losses(two) == pytest.approx(one.losses, rel=RUN64_LOSS_RTOL)
    paths = [o.split("=", 1)[1] for o in CASES[case] if o.startswith("model.path=")]
    model = Path(assets.resolve(paths[0])) if paths else Path(micro_model_path)
    start, end = load_file(model / "model.safetensors"), load_file(one.final_dir / "model.safetensors")
    assert all(not start[k].double().equal(end[k]) for k in start)  # every tensor trained: the equality means something
    assert_same_weights(one.final_dir, two / "final")
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # rank 0 alone writes
    assert ("val_loss" in records[2]) == (case != "streaming")  # a stream validates on data.val_path only
    # each rank evaluates its share of the 53 validation sequences (the last global batch of 4 has one: rank 1 runs a
    # forward with no label counted), and the sums over the ranks give the one-process validation loss
    one_records = [json.loads(line) for line in (folder / f"one-{case}" / "metrics.jsonl").read_text().splitlines()]
    validated = [[r["val_loss"] for r in rs if "val_loss" in r] for rs in (records, one_records)]
    assert validated[0] == pytest.approx(validated[1], rel=RUN64_LOSS_RTOL)
    assert [r["val_tokens"] for r in records if "val_tokens" in r] == [
        r["val_tokens"] for r in one_records if "val_tokens" in r]


@pytest.mark.parametrize("rule", list(RESUMED))
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, rule):
    """1 → 2: the fixture's 1-process run resumed from its checkpoint-2 in 2 processes ends where it ended whole.
    2 → 1: a 2-process run's checkpoint-2 resumed in this process ends where the 2-process run ended whole.
    Adafactor's state has entries sharded as the weight (exp_avg), by its rows (the row statistic) and replicated
    (the column statistic)."""
    folder, recipe = runs
    whole, resumed = folder / f"whole-1-{rule}", folder / f"resume-1to2-{rule}"
    assert losses(resumed) == pytest.approx(losses(whole), rel=RUN64_LOSS_RTOL)
    assert_same_weights(whole / "final", resumed / "final")
    assert json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 2

    resume_in_one_process(folder, recipe, rule, RESUMED[rule])


def resume_in_one_process(folder: Path, recipe: Path, rule: str, extra: list[str]) -> None:
    """The 2-process run's checkpoint-2 resumed in this process ends where the 2-process run ended whole; a changed
    global micro-batch is refused."""
    out = folder / f"resume-2to1-{rule}"
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    with pytest.raises(UserError, match=r"global micro-batch \(processes × train.batch_size\) was 2 × 2 when .* is "
                                        r"1 × 2 now.* set train.batch_size=4"):
        train(load_config(recipe, [*overrides(out, 1, *extra, SAVE_AT_2), "train.batch_size=2"]))
    one_process(recipe, out, *extra, SAVE_AT_2)
    assert losses(out) == pytest.approx(losses(folder / f"whole-2-{rule}"), rel=RUN64_LOSS_RTOL)
    assert_same_weights(folder / f"whole-2-{rule}" / "final", out / "final")


def test_a_lion8bit_checkpoint_of_two_processes_resumes_in_one(runs):
    """lion8bit's codes and absmax, saved by rows from 2 processes, read whole by one."""
    folder, recipe = runs
    resume_in_one_process(folder, recipe, "lion8bit", RESUMED_SHARDED["lion8bit"])


def test_a_tied_models_sharded_checkpoint_loads_whole_in_one_process(runs):
    """The tied weight is saved once; lowmem.load_model in one process reads the shards whole, tied as the model is,
    and equal to the export of the same step (the last)."""
    from lowmem.model import load_model

    folder, _ = runs
    model = load_model(str(folder / "two-tied" / "checkpoint-4"), "float64")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    saved = {k for f in (folder / "two-tied" / "checkpoint-4" / "model").glob("*.safetensors") for k in load_file(f)}
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    exported = load_file(folder / "two-tied" / "final" / "model.safetensors")
    state = model.state_dict()
    for key, tensor in exported.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("rule", [*RESUMED, *RESUMED_SHARDED])
def test_a_sharded_checkpoint_holds_each_ranks_rows_and_resumes_in_as_many(runs, rule):
    """A 2-process checkpoint is sharded (torch.distributed.checkpoint, safetensors): each rank's file holds its rows of
    every weight and state entry, none holds a whole one, and a run resumed from it in 2 processes ends where the
    uninterrupted one ended."""
    folder, _ = runs
    saved = folder / f"whole-2-{rule}" / "checkpoint-2"
    assert not (saved / "model.safetensors").exists() and not (saved / "optimizer.safetensors").exists()
    assert (saved / "rng.safetensors").exists() and (saved / "rng-rank1.safetensors").exists()
    whole = load_file(folder / f"whole-2-{rule}" / "final" / "model.safetensors")
    weight = "model.layers.0.mlp.down_proj.weight"
    keys = {"model": [weight], "optimizer": [f"{weight}::{STATE_KEY[rule]}"]}
    if rule == "lion8bit":
        keys["optimizer"].append(f"{weight}::exp_avg_absmax")
    for part, names in keys.items():
        files = sorted((saved / part).glob("*.safetensors"))
        assert len(files) == 2
        ranks = [load_file(f) for f in files]
        for name in names:
            assert [r[name].shape[0] for r in ranks if name in r] == [whole[weight].shape[0] // 2] * 2
    resumed = folder / f"resume-2to2-{rule}"
    assert losses(resumed) == pytest.approx(losses(folder / f"whole-2-{rule}")[2:], rel=RUN64_LOSS_RTOL)
    assert_same_weights(folder / f"whole-2-{rule}" / "final", resumed / "final")


def test_plan_of_a_rank_counts_its_shards_as_the_run_holds_them(runs, micro_model_path):
    """``lowmem plan --nproc 2`` shards the fake model with FSDP2 itself: rank 0's weights are its torch.chunk rows of
    each parameter (counted independently here), and its rule state is what the real 2-process run reports."""
    from lowmem.model import load_model
    from lowmem.planner.plan import simulate

    folder, recipe = runs
    config = load_config(recipe, overrides(folder / "plan", 2, *CASES["lion"]))
    plan = simulate(config, target="cpu", nproc=2)
    model = load_model(micro_model_path, "float64", torch.device("cpu"))
    shards = sum(torch.chunk(p, 2, dim=0)[0].nbytes for p in model.parameters())
    assert plan.device["weights float64"] == shards
    assert simulate(config, target="cpu").device["weights float64"] == sum(p.nbytes for p in model.parameters())
    record = [json.loads(line) for line in (folder / "two-lion" / "metrics.jsonl").read_text().splitlines()][-1]
    assert plan.device["rule state"] == record["state_bytes"]  # Lion's momentum of the shards


def test_what_is_not_supported_is_refused_in_one_line(runs, tmp_path):
    from lowmem.distributed.support import check_resume, check_supported

    _folder, recipe = runs
    refused = {("tokens.eliminate=true",): "tokens.eliminate is not supported",
               ("update.strategy=hift", "memory.offload_frozen_weights=true"):
                   "memory.offload_frozen_weights and memory.offload_embeddings are not supported",
               ("model.weight_format=int8",): "model.weight_format=int8 is not supported",
               ("update.trainable=norms",): "update.trainable \\(PERP\\)"}
    for override, message in refused.items():
        config = load_config(recipe, [*COMMON, *override])
        with pytest.raises(UserError, match=f"distributed: .*{message}"):
            check_supported(config, config.model.path)
    with pytest.raises(UserError, match="distributed: a one-process lion8bit checkpoint does not resume"):
        check_resume(load_config(recipe, [*COMMON, "update.rule=lion8bit"]), sharded_checkpoint=False)
    # the micro model's rows are 64 values: lion8bit's blocks of 256 would straddle the shards (refused by each rank)
    done = subprocess.run([sys.executable, "-m", "lowmem", "train", str(recipe),
                           *overrides(tmp_path / "h", 2, "update.rule=lion8bit"), "--nproc", "2"],
                          capture_output=True, text=True, env=launch_env(), timeout=300)
    assert done.returncode != 0
    assert "distributed: lion8bit's blocks of 256 would straddle the shards of model.layers.0" in done.stderr
    assert "error: train --nproc 2: rank" in done.stderr


def test_a_failing_rank_stops_the_others(runs, tmp_path):
    """Rank 1 fails after joining the group; rank 0 waits in the step's first collective: torchrun stops it, and the
    launcher names the rank (no hang: the subprocess's timeout would fail the test)."""
    _folder, recipe = runs
    done = subprocess.run([sys.executable, "-c", "from lowmem.distributed.launch import launch; "
                           f"launch(2, ['{recipe}', '{tmp_path / 'x'}'], module='distributed_fault')"],
                          capture_output=True, text=True, timeout=240, env=launch_env())
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert "rank 1 failed" in done.stderr


def one_gpu_smoke(folder: Path, micro_model_path: str, text_data: str, device: str) -> None:
    """One process launched by ``--nproc 1`` (FSDP2, world size 1: NCCL on ``cuda:0``, gloo on the CPU) equals the
    plain run on the same device, float64 (the bounds of float_error.py hold on any device); standard AdamW with the
    chunked loss, a sharded checkpoint at step 2 resumed to the same end."""
    recipe = write_recipe(folder, micro_model_path, text_data)
    extra = ["update.rule=adamw", "memory.loss_chunk_tokens=16", SAVE_AT_2, f"train.device={device}"]
    plain = train(load_config(recipe, overrides(folder / "plain", 1, *extra)))
    out = folder / "fsdp2"
    command = [sys.executable, "-m", "lowmem", "train", str(recipe), *overrides(out, 1, *extra), "--nproc", "1"]
    for resumed in (False, True):
        done = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert f"distributed: 1 processes ({'nccl' if device == 'cuda' else 'gloo'}), FSDP2" in done.stderr
        assert losses(out) == pytest.approx(plain.losses, rel=RUN64_LOSS_RTOL)
        assert_same_weights(plain.final_dir, out / "final")
        assert (out / "checkpoint-2" / "model").is_dir()  # sharded
        if not resumed:
            shutil.rmtree(out / "checkpoint-4")
            shutil.rmtree(out / "final")


@pytest.mark.cuda
def test_one_gpu_runs_the_fsdp2_path_as_the_plain_run(tmp_path, micro_model_path, text_data):
    """The GPU smoke test of the FSDP2 path (``make gpu-check`` runs it): NCCL at world size 1 on one GPU. No figure
    of several GPUs comes from it."""
    one_gpu_smoke(tmp_path, micro_model_path, text_data, "cuda")
