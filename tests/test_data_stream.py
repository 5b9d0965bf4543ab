"""data.streaming: rows read lazily and shuffled in a buffer give, per epoch, exactly the sequences the in-memory
path gives; the position resumes exactly (mid-epoch, across an epoch, with packing's partial block); the file is
never read whole."""

import pytest

from conftest import write_jsonl
from lowmem.config import DataConfig
from lowmem.data import build_datasets, tokenize_rows
from lowmem.data_stream import StreamingBatches, draw_slot
from lowmem.errors import DataError

ALPACA = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}, " + "so " * (i % 7)}
          for i in range(37)]


def config(path, **kw):
    return DataConfig(path=path, streaming=True, **kw)


def sequences(stream, count):
    """``count`` sequences as tuples of token ids (one per batch row, padding cut by the attention mask)."""
    out = []
    while len(out) < count:
        batch = stream.next()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out[:count]


def test_each_epoch_is_every_row_once_in_a_seeded_shuffled_order(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    in_memory = build_datasets(DataConfig(path=path, format="alpaca", val_fraction=0.0), tokenizer, 0).train
    expected = sorted(tuple(e.input_ids) for e in in_memory)
    stream = StreamingBatches(config(path, format="alpaca", shuffle_buffer=8), tokenizer, 1, seed=3, pad_id=0)
    first, second = sequences(stream, 37), sequences(stream, 37)
    assert sorted(first) == expected and sorted(second) == expected  # each row once per epoch
    assert first != second and first != [tuple(e.input_ids) for e in in_memory]  # shuffled, anew each epoch
    assert stream.epoch == 1
    again = StreamingBatches(config(path, format="alpaca", shuffle_buffer=8), tokenizer, 1, seed=3, pad_id=0)
    assert sequences(again, 37) == first  # the seed decides the order
    ordered = StreamingBatches(config(path, format="alpaca", shuffle_buffer=1), tokenizer, 1, seed=3, pad_id=0)
    assert sequences(ordered, 37) == [tuple(e.input_ids) for e in in_memory]  # a buffer of 1: the file's order


def test_draws_are_spread_over_the_buffer():
    counts = [0] * 7
    for draw in range(7000):
        counts[draw_slot(5, 2, draw, 7)] += 1
    assert all(900 < c < 1100 for c in counts)  # 1000 ± 3.2 sd of a binomial(7000, 1/7)


def test_packed_blocks_are_the_drawn_rows_tokens_in_draw_order(tmp_path, tokenizer):
    rows = [{"text": f"document {i} " + "words " * (3 * i % 11)} for i in range(23)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = config(path, max_seq_len=16, shuffle_buffer=1)
    stream = StreamingBatches(data, tokenizer, 1, seed=0, pad_id=0)
    all_tokens = [t for e in tokenize_rows(data, tokenizer, list(enumerate(rows)), "d") for t in e.input_ids]
    blocks = sequences(stream, len(all_tokens) // 16)
    assert all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] == all_tokens[: 16 * len(blocks)]
    # the partial block at the end of the file carries into the next epoch's first rows
    carried = sequences(stream, 1)[0]
    tail = len(all_tokens) % 16
    assert list(carried) == all_tokens[len(all_tokens) - tail:] + all_tokens[: 16 - tail]


@pytest.mark.parametrize("fmt,rows,seq", [("alpaca", ALPACA, 64),
                                          ("text", [{"text": "w " * (5 + 7 * i % 40)} for i in range(29)], 24)])
def test_the_position_resumes_exactly_anywhere(tmp_path, tokenizer, fmt, rows, seq):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = config(path, format=fmt, max_seq_len=seq, shuffle_buffer=6)
    whole = StreamingBatches(data, tokenizer, 3, seed=1, pad_id=0)
    reference = [whole.next()["input_ids"].tolist() for _ in range(40)]  # several epochs
    for stop in (1, 5, 11, 13, 26):
        first = StreamingBatches(data, tokenizer, 3, seed=1, pad_id=0)
        for _ in range(stop):
            first.next()
        state = first.state_dict()
        resumed = StreamingBatches(data, tokenizer, 3, seed=1, pad_id=0)
        resumed.load_state_dict(state)
        assert [resumed.next()["input_ids"].tolist() for _ in range(40 - stop)] == reference[stop:], stop
        assert resumed.epoch == whole.epoch


def test_the_file_is_read_lazily(tmp_path, tokenizer):
    rows = [{"text": f"line {i} " + "x " * 20} for i in range(2000)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stream = StreamingBatches(config(path, max_seq_len=32, shuffle_buffer=16), tokenizer, 2, seed=0, pad_id=0)
    stream.next()
    # the buffer and one tokenizing group (64 draws, the buffer topped up before each): never the 2000 rows
    assert stream.rows_read == 16 + 64 - 1 and len(stream.state_dict()["buffer"]) == 15


def test_stream_errors_name_the_line_and_the_changed_data(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f'{{"text": "row {i} words words"}}\n' for i in range(300)) + "{oops\n")
    stream = StreamingBatches(config(str(bad), max_seq_len=8, shuffle_buffer=4), tokenizer, 1, seed=0, pad_id=0)
    with pytest.raises(DataError, match="bad.jsonl: line 301 is not valid JSON"):
        for _ in range(1000):
            stream.next()
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    stream = StreamingBatches(config(path, format="alpaca", shuffle_buffer=8), tokenizer, 1, seed=0, pad_id=0)
    sequences(stream, 20)
    state = stream.state_dict()
    write_jsonl(tmp_path / "d.jsonl", ALPACA[:5])
    with pytest.raises(DataError, match="has no row .* which the checkpoint's position holds: the data changed"):
        StreamingBatches(config(path, format="alpaca"), tokenizer, 1, seed=0, pad_id=0).load_state_dict(state)
    long_prompt = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q " * 50, "output": "a"}])
    stream = StreamingBatches(config(long_prompt, format="alpaca", max_seq_len=8), tokenizer, 1, seed=0, pad_id=0)
    with pytest.raises(DataError, match="no row has label tokens"):
        stream.next()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_parquet_and_csv_stream_like_jsonl(tmp_path, tokenizer, suffix):
    from test_data import write_twin

    twin = write_twin(tmp_path / f"d{suffix}", ALPACA, suffix)
    reference = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    streams = [StreamingBatches(config(p, format="alpaca", shuffle_buffer=5), tokenizer, 2, seed=0, pad_id=0)
               for p in (twin, reference)]
    assert sequences(streams[0], 40) == sequences(streams[1], 40)


STREAMING = ("data.streaming=true", "data.val_fraction=null", "data.shuffle_buffer=4")


def test_a_streamed_run_resumes_exactly_and_validates_on_val_path(tmp_path, micro_model_path, text_data):
    from test_trainer import assert_resume_is_exact

    second = assert_resume_is_exact(tmp_path, micro_model_path, text_data, *STREAMING, f"data.val_path={text_data}")
    assert second.last_eval["val_loss"] > 0


def test_streaming_refuses_what_needs_the_whole_file(tmp_path, micro_model_path, text_data):
    from lowmem.errors import ConfigError, UserError
    from lowmem.trainer import train
    from test_trainer import make_config

    with pytest.raises(ConfigError, match="data.streaming does not know the stream's length.* set train.max_steps"):
        make_config(tmp_path, micro_model_path, text_data, *STREAMING, "train.max_steps=null")
    with pytest.raises(ConfigError, match="data.val_fraction 0.1 would hold out rows of a stream .*\(data.val_path\)"):
        make_config(tmp_path, micro_model_path, text_data, "data.streaming=true")
    train(make_config(tmp_path, micro_model_path, text_data, *STREAMING, "train.max_steps=2"))
    with pytest.raises(UserError, match="data.streaming was True when .* was saved and is False now"):
        train(make_config(tmp_path, micro_model_path, text_data, "data.val_fraction=null"))


def test_wanda_calibrates_on_the_streams_first_sequences(tmp_path, tokenizer, micro_model_path, text_data):
    from lowmem.data import eval_batches
    from lowmem.perp.retrain import calibration_batches, calibration_sequences
    from test_trainer import make_config

    config = make_config(tmp_path, micro_model_path, text_data, *STREAMING, "prune.criterion=wanda",
                         "prune.calibration_batches=3")
    streamed = list(calibration_batches(config, calibration_sequences(config, tokenizer, []), tokenizer.pad_token_id))
    in_memory = build_datasets(DataConfig(path=text_data, max_seq_len=48, val_fraction=0.0), tokenizer, 0).train
    expected = list(eval_batches(in_memory, 2, tokenizer.pad_token_id, 3))
    assert len(streamed) == 3 and all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(streamed, expected))
