"""Every data format tokenizes with the right loss mask; malformed rows name the row and the field."""

import pytest

from conftest import write_jsonl
from lowmem.config import DataConfig
from lowmem.data import IGNORE, BatchStream, build_datasets, pack, tokenize_chat
from lowmem.errors import DataError


def labelled_text(tokenizer, example) -> str:
    """The decoded label tokens, each contiguous run joined by '|'."""
    runs, current = [], []
    for tok, label in zip(example.input_ids, example.labels):
        if label == IGNORE:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == tok
            current.append(label)
    if current:
        runs.append(current)
    return "|".join(tokenizer.decode(r) for r in runs)


def load(tmp_path, tokenizer, rows, fmt, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return build_datasets(DataConfig(path=path, format=fmt, val_fraction=0.0, **kw), tokenizer, seed=0)


def test_alpaca_trains_only_on_the_response(tmp_path, tokenizer):
    rows = [{"instruction": "Name a builtin.", "input": "Python", "output": "len returns a length."}]
    (example,) = load(tmp_path, tokenizer, rows, "alpaca").train
    assert labelled_text(tokenizer, example) == "len returns a length.<|eos|>\n"
    full = tokenizer.decode(example.input_ids)
    assert full.startswith("<|user|>\nName a builtin.\n\nPython\n<|assistant|>\n")


def test_sharegpt_labels_every_assistant_turn_and_no_user_turn(tmp_path, tokenizer):
    rows = [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is a list?"},
        {"from": "gpt", "value": "A mutable sequence."},
        {"from": "human", "value": "And a tuple?"},
        {"from": "gpt", "value": "An immutable one."},
    ]}]
    (example,) = load(tmp_path, tokenizer, rows, "sharegpt").train
    assert labelled_text(tokenizer, example) == "A mutable sequence.<|eos|>\n|An immutable one.<|eos|>\n"


def test_messages_format_and_unmasked_option(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}]
    (masked,) = load(tmp_path, tokenizer, rows, "messages").train
    assert labelled_text(tokenizer, masked) == "Hello there.<|eos|>\n"
    (unmasked,) = load(tmp_path, tokenizer, rows, "messages", mask_prompt=False).train
    assert unmasked.labels == unmasked.input_ids


def test_template_of_a_tokenizer_without_one_is_the_default(tmp_path, tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    (example,) = tokenize_chat([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], tok)
    assert labelled_text(tok, example) == "b<|eos|>\n"


def test_text_is_packed_into_full_blocks_with_eos_between_documents(tmp_path, tokenizer):
    rows = [{"text": f"document number {i} " * 20} for i in range(30)]
    data = load(tmp_path, tokenizer, rows, "text", max_seq_len=32)
    assert data.train and all(len(e.input_ids) == 32 and e.labels == e.input_ids for e in data.train)
    stream = [t for e in data.train for t in e.input_ids]
    assert tokenizer.eos_token_id in stream


def test_pack_drops_only_the_partial_tail():
    from lowmem.data import Example

    blocks = pack([Example([1, 2, 3], [1, 2, 3]), Example([4, 5, 6, 7], [IGNORE, 5, 6, 7])], 3)
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [4, 5, 6]]
    assert blocks[1].labels == [IGNORE, 5, 6]


def test_validation_split_is_by_row_and_deterministic(tmp_path, tokenizer):
    rows = [{"text": f"topic {i} " * 30} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=path, format="text", val_fraction=0.1, max_seq_len=16)
    a, b = build_datasets(cfg, tokenizer, seed=1), build_datasets(cfg, tokenizer, seed=1)
    assert [e.input_ids for e in a.val] == [e.input_ids for e in b.val] and a.val
    assert len(a.train) > len(a.val)


def test_txt_files_read_one_document_per_line(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(f"line {i} with words" for i in range(50)))
    data = build_datasets(DataConfig(path=str(path), format="text", val_fraction=0, max_seq_len=8), tokenizer, 0)
    assert len(data.train) > 10


@pytest.mark.parametrize("fmt,rows,message", [
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "c"}], "row 1 of d.jsonl: field 'output' is missing"),
    ("sharegpt", [{"conversations": [{"from": "robot", "value": "x"}]}], "conversations[0].from 'robot'"),
    ("messages", [{"messages": [{"role": "user", "content": "only a question"}]}], "has no assistant turn"),
    ("text", [{"body": "x"}], "field 'text' is missing"),
], ids=["alpaca-missing-output", "sharegpt-bad-role", "messages-no-assistant", "text-wrong-field"])
def test_malformed_rows_name_the_row_and_field(tmp_path, tokenizer, fmt, rows, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load(tmp_path, tokenizer, rows, fmt)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_json_are_one_line_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{not json\n{"text": "after"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 4 is not valid JSON \(.* column 2\); fix or remove") as err:
        build_datasets(DataConfig(path=str(bad)), tokenizer, 0)
    assert "\n" not in str(err.value)
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"text": "ok"}\n["a", "b"]\n')
    with pytest.raises(DataError, match="list.jsonl: line 2 is a JSON list, not an object"):
        build_datasets(DataConfig(path=str(listed)), tokenizer, 0)
    document = tmp_path / "doc.json"
    document.write_text('[\n {"text": "ok"},\n {"text": oops}\n]\n')
    with pytest.raises(DataError, match="doc.json: line 3 is not valid JSON"):
        build_datasets(DataConfig(path=str(document)), tokenizer, 0)
    document.write_text('{\n "text": "ok",\n "more": [1, 2,]\n}\n')  # one pretty-printed object
    with pytest.raises(DataError, match="doc.json: line 3 is not valid JSON"):
        build_datasets(DataConfig(path=str(document)), tokenizer, 0)
    separators = tmp_path / "sep.jsonl"  # U+2028 inside a string is valid JSON; the bad line is the third
    separators.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n{oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match="sep.jsonl: line 3 is not valid JSON"):
        build_datasets(DataConfig(path=str(separators)), tokenizer, 0)


def test_batch_stream_order_is_independent_of_batch_size_and_resumes(tokenizer):
    from lowmem.data import Example

    examples = [Example([i, i], [i, i]) for i in range(10)]
    big = BatchStream(examples, 4, seed=0, pad_id=0)
    small = BatchStream(examples, 2, seed=0, pad_id=0)
    first = big.next()["input_ids"][:, 0].tolist()
    assert first == small.next()["input_ids"][:, 0].tolist() + small.next()["input_ids"][:, 0].tolist()
    saved = small.state_dict()
    expected = [small.next()["input_ids"][:, 0].tolist() for _ in range(6)]  # crosses an epoch
    resumed = BatchStream(examples, 2, seed=0, pad_id=0)
    resumed.load_state_dict(saved)
    assert [resumed.next()["input_ids"][:, 0].tolist() for _ in range(6)] == expected


def test_validation_rows_shorter_than_one_block_still_validate(tmp_path, tokenizer):
    from conftest import write_jsonl

    rows = [{"text": f"row {i}: " + "word " * 60} for i in range(20)]  # each far shorter than a block
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_datasets(DataConfig(path=path, max_seq_len=512, val_fraction=0.05), tokenizer, 0)
    assert len(data.val) == 1 and 2 <= len(data.val[0].input_ids) < 512  # one row, shorter than a block
    assert all(len(e.input_ids) == 512 for e in data.train)  # training blocks stay full


TWIN_ROWS = {
    "text": [{"text": "A list is a mutable sequence."}, {"text": "A tuple, with a comma, is not."},
             {"text": "Dicts map keys to values; sets hold unique items."}],
    "alpaca": [{"instruction": "Name a builtin.", "input": "Python", "output": "len returns a length."},
               {"instruction": "Say hi.", "input": "", "output": "Hello, world."}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "What is a list?"},
                                    {"from": "gpt", "value": "A mutable sequence."}]},
                 {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Tuple?"},
                                    {"from": "gpt", "value": "Immutable."}]}],
    "messages": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
                 {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
}


def write_twin(path, rows, suffix):
    """``rows`` as a parquet file (nested lists as lists) or a csv file (a list of turns as JSON text, as CSV
    exports of chat datasets store it)."""
    import json

    import pandas as pd

    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]).to_csv(
            path, index=False)
    return str(path)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("fmt", list(TWIN_ROWS))
def test_parquet_and_csv_train_like_their_jsonl_twin(tmp_path, tokenizer, fmt, suffix):
    rows = TWIN_ROWS[fmt]
    config = dict(format=fmt, val_fraction=0.0, max_seq_len=16 if fmt == "text" else 64)
    twin = build_datasets(DataConfig(path=write_twin(tmp_path / f"d{suffix}", rows, suffix), **config), tokenizer, 0)
    reference = build_datasets(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), **config), tokenizer, 0)
    assert twin.train and twin.train == reference.train


def test_a_csv_chat_cell_that_is_not_json_names_the_row_and_field(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": '
                    '""Hello""}]"\nnot json\n')
    with pytest.raises(DataError, match="row 1 of d.csv: field 'messages' is text that is not JSON"):
        build_datasets(DataConfig(path=str(path), format="messages", val_fraction=0.0), tokenizer, 0)


def test_an_unsupported_file_type_names_the_supported_ones(tmp_path, tokenizer):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx' \(use .json, .jsonl, .txt, .parquet, .csv, "):
        build_datasets(DataConfig(path=str(path)), tokenizer, 0)


@pytest.mark.parametrize("fmt,row,fields", [
    ("alpaca", {"question": "Name a builtin.", "context": "Python", "answer": "len returns a length."},
     {"instruction": "question", "input": "context", "output": "answer"}),
    ("sharegpt", {"turns": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]},
     {"conversations": "turns"}),
    ("messages", {"chat": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
     {"messages": "chat"}),
])
def test_field_map_reads_other_column_names_as_the_standard_ones(tmp_path, tokenizer, fmt, row, fields):
    from lowmem.config import DataFieldsConfig

    renamed = {v: k for k, v in fields.items()}
    standard = {renamed.get(k, k): v for k, v in row.items()}
    ours = load(tmp_path, tokenizer, [row], fmt, fields=DataFieldsConfig(**fields)).train
    reference = load(tmp_path, tokenizer, [standard], fmt).train
    assert [(e.input_ids, e.labels) for e in ours] == [(e.input_ids, e.labels) for e in reference]
    with pytest.raises(DataError, match=f"field '{next(iter(fields.values()))}' is missing"):
        load(tmp_path, tokenizer, [standard], fmt, fields=DataFieldsConfig(**fields))
