"""Resume safety: a changed recipe that would give the saved state another meaning is refused in one line naming
the field; what only steers the rest of the run may change; a metrics file cut short by a kill and temporary
folders left by one do not get in the way."""

import json
import os

import pytest

from lowmem.errors import UserError
from lowmem.trainer import train
from test_trainer import make_config


@pytest.fixture
def saved_run(tmp_path, micro_model_path, text_data):
    """A 2-step run of the standard recipe, checkpointed at step 2; returns a config maker for its output_dir."""
    train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=2"))
    return lambda *overrides: make_config(tmp_path, micro_model_path, text_data, "train.max_steps=4", *overrides)


def test_resume_refuses_what_changes_the_meaning_of_saved_state(saved_run):
    changes = {
        "update.rule=lion": "update.rule was 'adamw' when .*checkpoint-2 was saved and is 'lion' now",
        "update.strategy=fused": "update.strategy was 'standard'",
        "model.weight_format=int8": "model.weight_format was 'float'",
        "model.dtype=bfloat16": "model.dtype was 'float32'",
        "data.max_seq_len=32": "data.max_seq_len was 48",
        "train.seed=8": r"train.seed was 7 .* \(set train.seed=7 to resume",
        "train.batch_size=4": "train.batch_size was 2",
    }
    for override, message in changes.items():
        with pytest.raises(UserError, match=message):
            train(saved_run(override))
    with pytest.raises(UserError, match="checkpoint-2 is at step 2, past this run's 1 steps .* train.max_steps=2"):
        train(saved_run("train.max_steps=1"))
    # a beta1 for Adafactor creates its first-moment state: null ↔ value changes its meaning, value ↔ value not
    from lowmem.resume import check_compatible

    adafactor = lambda beta1: {"update": {"rule": "adafactor", "adafactor": {"beta1": beta1}}}  # noqa: E731
    check_compatible("ckpt", adafactor(0.9), adafactor(0.8))
    with pytest.raises(UserError, match="update.adafactor.beta1 was None when ckpt was saved and is 0.9 now"):
        check_compatible("ckpt", adafactor(None), adafactor(0.9))


def test_resume_refuses_a_hift_regrouping(tmp_path, micro_model_path, text_data):
    args = ("update.strategy=hift", "hift.group_size=2")
    train(make_config(tmp_path, micro_model_path, text_data, *args, "train.max_steps=2"))
    with pytest.raises(UserError, match="hift.group_size was 2 .* is 3 now"):
        train(make_config(tmp_path, micro_model_path, text_data, *args, "hift.group_size=3"))


def test_resume_refuses_other_data_under_the_same_name(saved_run, text_data):
    lines = open(text_data).read().splitlines()
    try:
        with open(text_data, "w") as f:
            f.write("\n".join(lines[:30]) + "\n")
        with pytest.raises(UserError, match="the training data now makes .* sequences, .* when .* was saved"):
            train(saved_run())

    finally:
        with open(text_data, "w") as f:
            f.write("\n".join(lines) + "\n")


def test_resume_allows_what_only_steers_the_rest_of_the_run(saved_run, tmp_path):
    moved = tmp_path / "moved-model"  # model.path is not read on resume: weights and tokenizer come from the checkpoint
    result = train(saved_run("update.lr=1e-3", "log.every_n_steps=2", "train.eval_every_n_steps=3",
                             "checkpoint.keep_last=1", "update.clip_grad_norm=0.5", f"model.path={moved}"))
    assert len(result.losses) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # 3: an evaluation (a log point), 4: the last step
    assert "val_loss" in records[3] and records[-1]["lr"] < 1e-3


def test_a_metrics_line_cut_short_and_stale_temporaries_are_cleaned_up(saved_run, tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 6.9')  # killed mid-write
    stale = tmp_path / "run" / ".tmp-checkpoint-3-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model")
    (tmp_path / "run" / ".old-final-123").mkdir()
    train(saved_run())
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert not stale.exists() and not (tmp_path / "run" / ".old-final-123").exists()


def test_a_kill_between_the_two_renames_of_a_replaced_folder_restores_the_old_one(saved_run, tmp_path):
    # publish_folder moves checkpoint-2 aside, then renames the new one in; killed in between, only .old- holds it
    run = tmp_path / "run"
    os.rename(run / "checkpoint-2", run / ".old-checkpoint-2-4242")
    (run / ".tmp-checkpoint-2-x1y2").mkdir()
    result = train(saved_run())
    assert len(result.losses) == 2  # steps 3 and 4: resumed from the restored checkpoint-2
    assert not list(run.glob(".old-*")) and not list(run.glob(".tmp-*"))


def test_as_many_sequences_with_other_tokens_are_other_data():
    from lowmem.data import Example, fingerprint
    from lowmem.resume import check_same_data

    examples = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [4, 5])]
    saved = {"train_sequences": 2, "train_fingerprint": fingerprint(examples)}
    check_same_data("ckpt", saved, 2, fingerprint([Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [4, 5])]))
    for other in ([Example([1, 2, 3], [-100, 2, 3]), Example([4, 6], [4, 6])],  # a token
                  [Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5])],  # a label mask
                  [Example([4, 5], [4, 5]), Example([1, 2, 3], [-100, 2, 3])],  # the order
                  [Example([1, 2], [-100, 2]), Example([3, 4, 5], [3, 4, 5])]):  # the boundaries
        with pytest.raises(UserError, match="now makes 2 sequences as when ckpt was saved, but other ones"):
            check_same_data("ckpt", saved, 2, fingerprint(other))
