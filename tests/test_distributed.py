"""Several processes on FSDP2 (gloo, CPU): a 2-process run equals the plain 1-process run with the same global batch,
loss for loss and weight for weight (float64: the same math summed in another order, bounded in float_error.py);
checkpoints resume on another number of processes; what is not supported yet is refused in one line; a rank that
fails stops the others."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from float_error import RUN64_ADAM_EPS, RUN64_LOSS_RTOL, assert_same_run64
from lowmem.config import load_config
from lowmem.trainer import train

TESTS = Path(__file__).resolve().parent
COMMON = ["model.dtype=float64", *RUN64_ADAM_EPS, "train.device=cpu", "train.max_steps=4"]


@pytest.fixture
def recipe(tmp_path, micro_model_path, text_data):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {{path: {micro_model_path}}}\n"
        f"data: {{path: {text_data}, max_seq_len: 48, val_fraction: 0.1}}\n"
        "update: {rule: adamw, lr: 3.0e-3, weight_decay: 0.01, clip_grad_norm: 1.0}\n"
        "train: {batch_size: 4, lr_schedule: cosine, warmup_ratio: 0.25, seed: 7, eval_every_n_steps: 2}\n"
        "log: {progress: false}\n"
    )
    return path


def run(recipe, out: Path, *overrides, nproc: int | None = None, check: bool = True):
    """``lowmem train`` of ``recipe`` into ``out``: in this process, or in ``nproc`` processes (subprocesses)."""
    args = [*COMMON, f"checkpoint.output_dir={out}", *overrides]
    if nproc is None:
        return train(load_config(recipe, args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lowmem", "train", str(recipe), *args, "--nproc", str(nproc)],
                          capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert_same_run64(wa[key], wb[key], key)


FUSED = "update.strategy=fused"


@pytest.mark.parametrize("rule,extra", [
    ("adamw", ["train.gradient_accumulation_steps=2"]), ("sgd", ["update.lr=0.3"]), ("lion", ["update.lr=3e-4"]),
    ("adafactor", ["update.adafactor.beta1=0.9", "update.lr=1e-2"]),
    ("adalomo", [FUSED, "update.lr=1e-2"]), ("adalomo", [FUSED, "update.lr=1e-2", "update.clip_mode=two_pass"]),
    ("sgd", [FUSED, "update.lr=0.3"]),
])
def test_two_processes_train_as_one_with_the_same_global_batch(recipe, tmp_path, rule, extra, micro_model_path):
    """Each strategy × rule on shards against the plain one-process run (the fused runs: per-tensor clipping, its
    norm summed over the ranks, and two-pass global clipping)."""
    one = run(recipe, tmp_path / "one", f"update.rule={rule}", *extra)
    run(recipe, tmp_path / "two", f"update.rule={rule}", "train.batch_size=2", *extra, nproc=2)
    assert losses(tmp_path / "two") == pytest.approx(one.losses, rel=RUN64_LOSS_RTOL)
    start, end = load_file(Path(micro_model_path) / "model.safetensors"), load_file(one.final_dir / "model.safetensors")
    assert all(not start[k].double().equal(end[k]) for k in start)  # every tensor trained: the equality means something
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")  # the export, gathered to rank 0
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and "val_loss" in records[2]  # rank 0 alone writes


@pytest.mark.parametrize("rule", [["update.rule=adamw"],
                                  ["update.rule=adafactor", "update.adafactor.beta1=0.9", "update.lr=1e-2"]])
def test_a_checkpoint_resumes_on_another_number_of_processes(recipe, tmp_path, rule):
    """Each run saves at step 2; its checkpoint-4 and final are removed and the run resumes from checkpoint-2 on the
    other number of processes (the same global micro-batch), ending where the uninterrupted run ends. Adafactor's
    state has entries sharded as the weight (exp_avg), by its rows (the row statistic) and replicated (the column
    statistic)."""
    import shutil

    for first, then in ((2, None), (None, 2)):
        out = tmp_path / f"from{first}"
        size = lambda nproc: "train.batch_size=2" if nproc else "train.batch_size=4"  # noqa: E731
        run(recipe, out, size(first), "checkpoint.save_every_n_steps=2", *rule, nproc=first)
        whole = losses(out)
        final = tmp_path / f"final{first}"
        shutil.copytree(out / "final", final)
        shutil.rmtree(out / "checkpoint-4")
        shutil.rmtree(out / "final")
        run(recipe, out, size(then), "checkpoint.save_every_n_steps=2", *rule, nproc=then)
        assert losses(out) == pytest.approx(whole, rel=RUN64_LOSS_RTOL)
        assert_same_weights(final, out / "final")
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        assert state.get("world_size", 1) == (then or 1)


def test_a_changed_global_batch_is_refused_on_resume(recipe, tmp_path):
    run(recipe, tmp_path / "r", "train.batch_size=2", "train.max_steps=2", nproc=2)
    done = run(recipe, tmp_path / "r", "train.batch_size=2", check=False, nproc=1)
    assert done.returncode != 0
    assert "global micro-batch (processes × train.batch_size) was 2 × 2 when" in done.stderr
    assert "is 1 × 2 now" in done.stderr and "set train.batch_size=4" in done.stderr


def test_what_is_not_supported_is_refused_in_one_line(recipe, tmp_path):
    from lowmem.distributed.support import check_supported
    from lowmem.errors import UserError

    refused = {"update.strategy=hift": "update.strategy=hift is not supported on several processes yet",
               "update.rule=lion8bit": "update.rule=lion8bit is not supported",
               "model.weight_format=int8": "model.weight_format=int8 is not supported",
               "memory.loss_chunk_tokens=64": "set memory.loss_chunk_tokens=0",
               "update.trainable=norms": "update.trainable \\(PERP\\)"}
    for override, message in refused.items():
        config = load_config(recipe, [*COMMON, override])
        with pytest.raises(UserError, match=f"distributed: .*{message}"):
            check_supported(config, config.model.path)
    done = run(recipe, tmp_path / "f", "update.strategy=hift", nproc=2, check=False)
    assert done.returncode != 0 and "distributed: update.strategy=hift is not supported" in done.stderr
    assert "error: train --nproc 2: rank" in done.stderr


def test_a_failing_rank_stops_the_others(recipe, tmp_path):
    """Rank 1 fails after joining the group; rank 0 waits in the step's first collective: torchrun stops it, and the
    launcher names the rank (no hang: the subprocess's timeout would fail the test)."""
    done = subprocess.run([sys.executable, "-c", "from lowmem.distributed.launch import launch; "
                           f"launch(2, ['{recipe}', '{tmp_path / 'x'}'], module='distributed_fault')"],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert "rank 1 failed" in done.stderr
