"""The standard loop end to end on a tiny Llama: accumulation, determinism, resume, export, metrics."""

import json

import pytest
import torch
from safetensors.torch import load_file

from float_error import RUN64_ADAM_EPS, RUN64_LOSS_RTOL, assert_same_run64
from lowmem import checkpoint as ckpt
from lowmem.config import load_config
from lowmem.trainer import train


# Every strategy, and int8 weights, as recipe overrides (for tests of features that compose with all of them)
EVERY_STRATEGY = {
    "standard": ["update.strategy=standard"],
    "fused": ["update.strategy=fused", "update.rule=adalomo"],
    "hift": ["update.strategy=hift", "hift.group_size=2"],
    "int8": ["model.weight_format=int8", "update.strategy=fused", "update.rule=lion8bit"],
}


def make_config(tmp_path, micro_model_path, text_data, *overrides, name="run"):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {micro_model_path}, dtype: float32}}\n"
        f"data: {{path: {text_data}, max_seq_len: 48, val_fraction: 0.1}}\n"
        "update: {rule: adamw, lr: 3.0e-3, weight_decay: 0.01, clip_grad_norm: 1.0}\n"
        "train: {batch_size: 2, max_steps: 4, lr_schedule: cosine, warmup_ratio: 0.25, seed: 7}\n"
        f"checkpoint: {{output_dir: {tmp_path / name}}}\n"
        "log: {progress: false}\n"
    )
    return load_config(recipe, list(overrides))


def weights(path):
    return load_file(path / "model.safetensors")


class Interrupted(Exception):
    pass


def stop_after(n_steps):
    """A ``step_guard`` that kills the run as step ``n_steps + 1`` begins, as a hard kill would."""
    entered = [0]

    class Guard:
        def __enter__(self):
            entered[0] += 1
            if entered[0] > n_steps:
                raise Interrupted
            return self

        def __exit__(self, *exc):
            return False

    return Guard


def initial_weights(config):
    """The weights a run of ``config`` starts from, as its exports write them."""
    from lowmem.weights.int8 import dequantized_state_dict
    from lowmem.model import load_model

    int8 = config.model.int8 if config.model.weight_format == "int8" else None
    return dequantized_state_dict(load_model(config.model.path, config.model.dtype, int8=int8, seed=config.train.seed))


def assert_resume_is_exact(tmp_path, model_path, data_path, *overrides, split_at=2, frozen=()):
    """A full run equals: the same run killed after step ``split_at`` (checkpointed there), resumed
    (checkpoint.resume=auto) and finished, loss for loss and weight for weight. ``frozen``: weights the recipe
    does not train (they must not move; every other one must)."""
    full_config = make_config(tmp_path, model_path, data_path, *overrides, name="full")
    full = train(full_config)
    killed = make_config(tmp_path, model_path, data_path, *overrides, f"checkpoint.save_every_n_steps={split_at}",
                         name="split")
    with pytest.raises(Interrupted):
        train(killed, step_guard=stop_after(split_at))
    at_split = weights(tmp_path / "split" / f"checkpoint-{split_at}")
    second = train(make_config(tmp_path, model_path, data_path, *overrides, name="split"))
    assert second.losses == full.losses[split_at:]
    wa, wb = weights(full.final_dir), weights(second.final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the equality means something only if the steps moved the weights: every weight before the split or after it,
    # against the weights as the run starts (int8 ones quantized: an export of untouched int8 weights is not the
    # float file)
    initial = initial_weights(full_config)
    before, after = [{k for k in wb if not torch.equal(a[k], b[k])} for a, b in ((initial, at_split), (at_split, wb))]
    moved = before | after
    assert after and moved == set(wb) - set(frozen), f"weights that never moved: {sorted(set(wb) - moved)[:3]}"
    return second


def test_accumulation_2x2_equals_batch_4(tmp_path, micro_model_path, text_data):
    # text blocks all have 48 tokens; chat-style padding is covered by the equal-token normalization. The same math
    # in another arrangement, so in float64 (tests/float_error.py).
    common = ["model.dtype=float64", *RUN64_ADAM_EPS]
    a = train(make_config(tmp_path, micro_model_path, text_data, *common, "train.batch_size=4", name="b4"))
    b = train(make_config(tmp_path, micro_model_path, text_data, *common, "train.batch_size=2",
                          "train.gradient_accumulation_steps=2", name="b2x2"))
    assert a.losses == pytest.approx(b.losses, rel=RUN64_LOSS_RTOL)
    wa, wb = weights(a.final_dir), weights(b.final_dir)
    for key in wa:
        assert_same_run64(wa[key], wb[key], key)


def test_accumulation_with_padding_normalizes_by_label_tokens(tmp_path, micro_model_path):
    from conftest import write_jsonl

    rows = [{"instruction": "q " * (i % 5 + 1), "output": "answer " * (i % 7 + 1)} for i in range(24)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    common = [f"data.path={path}", "data.format=alpaca", "data.val_fraction=0", "update.clip_grad_norm=null",
              "model.dtype=float64", *RUN64_ADAM_EPS]
    a = train(make_config(tmp_path, micro_model_path, path, *common, "train.batch_size=4", name="c4"))
    b = train(make_config(tmp_path, micro_model_path, path, *common, "train.batch_size=2",
                          "train.gradient_accumulation_steps=2", name="c2x2"))
    assert a.losses == pytest.approx(b.losses, rel=RUN64_LOSS_RTOL)


def test_same_seed_same_losses_and_loss_falls(tmp_path, micro_model_path, text_data):
    a = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=12", name="s1"))
    b = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=12", name="s2"))
    assert a.losses == b.losses
    assert sum(a.losses[-3:]) < sum(a.losses[:3])
    assert a.last_eval["val_loss"] < a.first_eval["val_loss"]


def test_resume_equals_uninterrupted_run(tmp_path, micro_model_path, text_data):
    # same output_dir, resume=auto: continues from checkpoint-2 with the 4-step schedule
    assert_resume_is_exact(tmp_path, micro_model_path, text_data, "update.rule=adamw")
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_resume_restores_rule_state_and_data_position(tmp_path, micro_model_path, text_data):
    train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=2", name="r"))
    latest = ckpt.latest_checkpoint(tmp_path / "r")
    state = ckpt.load_trainer_state(latest)
    assert latest.name == "checkpoint-2" and state["step"] == 2 and state["data"] == {"epoch": 0, "position": 4}
    optimizer = load_file(latest / "optimizer.safetensors")
    assert any(k.endswith("::exp_avg_sq") for k in optimizer)


def test_export_loads_in_transformers_and_generates(tmp_path, micro_model_path, text_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=2", name="exp"))
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    inputs = tokenizer("def f(x):", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    trained = weights(result.final_dir)
    original = load_file(f"{micro_model_path}/model.safetensors")
    assert any(not torch.equal(trained[k], original[k]) for k in original)


def test_metrics_jsonl_has_the_documented_fields(tmp_path, micro_model_path, text_data):
    train(make_config(tmp_path, micro_model_path, text_data, "train.eval_every_n_steps=2", name="m"))
    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_ppl" in records[0]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert {"step", "loss", "lr", "tokens_per_s", "peak_mem_bytes", "grad_norm", "state_bytes"} <= set(record)
        assert record["peak_mem_bytes"] > 0 and record["tokens_per_s"] > 0
    assert "val_loss" in steps[1] and "val_ppl" in steps[3]


def test_a_sparse_log_interval_loses_no_loss_and_no_checkpoint(tmp_path, micro_model_path, text_data):
    # values reach the host only at log points: every 3 steps, plus checkpoints (every 2) and the last step
    every = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=5", name="every"))
    sparse = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=5", "log.every_n_steps=3",
                               "checkpoint.save_every_n_steps=2", "checkpoint.keep_last=5", name="sparse"))
    assert sparse.losses == every.losses and len(sparse.losses) == 5
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "sparse")] == ["checkpoint-2", "checkpoint-4",
                                                                             "checkpoint-5"]
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 4, 5]
    assert [r["loss"] for r in records if "loss" in r] == every.losses[1:]


def test_crash_while_saving_leaves_no_checkpoint(tmp_path, micro_model_path, text_data, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=2", name="crash"))
    leftovers = list((tmp_path / "crash").iterdir())
    assert ckpt.latest_checkpoint(tmp_path / "crash") is None
    assert not [p for p in leftovers if p.name.startswith(("checkpoint", ".tmp"))]


def test_keep_last_prunes_old_checkpoints(tmp_path, micro_model_path, text_data):
    train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=4", "checkpoint.save_every_n_steps=1",
                      "checkpoint.keep_last=2", name="k"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "k")] == ["checkpoint-3", "checkpoint-4"]


def test_gradient_checkpointing_trains_the_same(tmp_path, micro_model_path, text_data):
    common = ["model.dtype=float64", *RUN64_ADAM_EPS]  # recomputation: the same math again, in float64 (float_error.py)
    plain = train(make_config(tmp_path, micro_model_path, text_data, *common, name="plain"))
    checkpointed = train(make_config(tmp_path, micro_model_path, text_data, *common, "model.gradient_checkpointing=true",
                                     name="gc"))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=RUN64_LOSS_RTOL)


def test_metrics_record_reserved_memory_on_a_gpu(monkeypatch):
    # what fails on a GPU is what the caching allocator reserves, not what is allocated: both are recorded there
    from lowmem.metrics import peak_memory_record

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7 * 2**30)
    assert peak_memory_record(torch.device("cuda")) == {"peak_mem_bytes": 5 * 2**30, "peak_reserved_bytes": 7 * 2**30}
    assert set(peak_memory_record(torch.device("cpu"))) == {"peak_mem_bytes"}  # the process's peak RSS


@pytest.mark.cuda
def test_cuda_metrics_record_allocated_and_reserved_peaks(tmp_path, micro_model_path, text_data):
    result = train(make_config(tmp_path, micro_model_path, text_data, "train.device=cuda", "train.max_steps=2"))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["peak_reserved_bytes"] >= r["peak_mem_bytes"] > 0 for r in steps)
