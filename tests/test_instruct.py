"""Instruction data against the book's own chapter-7 code (llms-from-scratch ch07): the prompt,
the tokenized texts, the collate function, the loss; and the errors for bad records."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge import GPTModel
from gptforge.errors import GptforgeError
from gptforge.instruct import (
    ALPACA, InstructionData, collate, format_input, read_records,
    respond, training_text,
)
from gptforge.tokenizer import get_tokenizer
from gptforge.train import lm_loss
from gen_helpers import positional_model

ch07 = pytest.importorskip("llms_from_scratch.ch07")
ch05 = pytest.importorskip("llms_from_scratch.ch05")

RECORDS = [
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Convert 5 kilometers to meters.", "input": "", "output": "5 kilometers is 5000 meters."},
    {"instruction": "Give a synonym for 'happy'.", "input": "", "output": "Joyful."},
    {"instruction": "Sort the numbers ascending.", "input": "9, 2, 7, 4",
     "output": "2, 4, 7, 9"},
]


def book_ids(records):
    return ch07.InstructionDataset(records, get_tokenizer().encoding).encoded_texts


def test_format_input_equals_the_books():
    for rec in RECORDS:  # with and without input
        assert format_input(rec) == ch07.format_input(rec)
        assert ALPACA.prompt(rec["instruction"], rec["input"]) == ch07.format_input(rec) + "\n\n### Response:\n"
    assert format_input({"instruction": "x", "output": "y"}) == ch07.format_input({"instruction": "x", "input": ""})


def test_tokenized_texts_equal_the_books_dataset():
    data = InstructionData(RECORDS, context_length=1024)
    assert data.ids == book_ids(RECORDS)
    assert [get_tokenizer().decode(i) for i in data.ids] == [training_text(r) for r in RECORDS]


@pytest.mark.parametrize("allowed_max_length", [None, 1024, 20])
def test_collate_equals_the_books_custom_collate_fn(allowed_max_length):
    ids = book_ids(RECORDS)
    ids[3] = ids[3][:5] + [50256] + ids[3][5:]  # an end token inside a text: the book ignores it as padding
    ours = collate(ids, allowed_max_length=allowed_max_length)
    book = ch07.custom_collate_fn(ids, allowed_max_length=allowed_max_length)
    for a, b in zip(ours, book):
        assert torch.equal(a, b)


def test_collate_keeps_the_first_end_token_as_target():
    inputs, targets = collate([[1, 2, 3], [4]])
    assert inputs.tolist() == [[1, 2, 3], [4, 50256, 50256]]
    assert targets.tolist() == [[2, 3, 50256], [50256, -100, -100]]


def test_mask_prompt_equals_the_books_exercise_7_2():
    """The book's exercise solution: targets[:instruction_length - 1] = -100 after its collate."""
    data = InstructionData(RECORDS, context_length=1024, mask_prompt=True)
    enc = get_tokenizer().encoding
    lengths = [len(enc.encode(ch07.format_input(r))) for r in RECORDS]
    inputs, targets = ch07.custom_collate_fn(book_ids(RECORDS))
    for row, length in enumerate(lengths):
        targets[row, :length - 1] = -100
    ours = data.batch(range(len(RECORDS)))
    assert torch.equal(ours[0], inputs) and torch.equal(ours[1], targets)
    # what stays is the response header and the output (and the first end token)
    first = targets[1][targets[1] != -100].tolist()
    assert get_tokenizer().decode(first) == "\n\n### Response:\n" + RECORDS[1]["output"] + "<|endoftext|>"


def test_loss_equals_the_books_calc_loss_batch(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257, context_length=128)).eval()
    batch = InstructionData(RECORDS, 128).batch([0, 1, 2])
    book = ch05.calc_loss_batch(*batch, model, "cpu")
    assert lm_loss(model, batch).item() == pytest.approx(book.item(), abs=1e-6)  # the fused loss, -100 left out


def test_json_and_jsonl_read_the_same_whatever_the_suffix(tmp_path):
    as_list, as_lines = json.dumps(RECORDS, indent=2), "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    for name, text in [("a.json", as_list), ("b.jsonl", as_lines), ("c.jsonl", as_list), ("d.json", as_lines),
                       ("e.txt", as_list), ("f", as_lines)]:
        (tmp_path / name).write_text(text)
        assert read_records(tmp_path / name) == RECORDS, name


def test_csv_records_keep_line_breaks_in_quoted_cells(tmp_path):
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "r.csv"
    pandas.DataFrame(RECORDS[:2] + [{"instruction": "List two.", "input": "", "output": "- one\n- two"}]
                     ).to_csv(path, index=False)
    expected = pandas.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    assert read_records(path) == expected and expected[2]["output"] == "- one\n- two"


@pytest.mark.parametrize("content, message", [
    ("", "is empty; it should hold records: a JSON list of objects or one JSON object per line"),
    (" \n", "is empty"),
    ("[]", "holds no records"),
    ('[{"input": "x", "output": "y"}]', "record 1 has no 'instruction' string; every record needs"),
    ('{"instruction": "x"}\n', "record 1 has no 'output' string"),
    ('{"instruction": "x", "output": "y"}\nnot json\n', r"line 2 is not valid JSON \(.*\); expected a JSON list"),
    ('{\n  "instruction": "x", "output": "y"\n}', r"line 1 is not valid JSON .*one JSON object per line"),
    ('[{"instruction": "x", "output": "y"},]', r"bad.json is not valid JSON \(.*line 1 column"),
    ('[{"instruction": "x", "output": "y"}, 1]', "record 2 is a JSON number, expected an object with named fields"),
    ('{"instruction": "x", "output": "y"}\n["x"]\n', "line 2 is a JSON list, expected an object"),
    ('[{"instruction": "x", "input": 3, "output": "y"}]', "record 1: 'input' must be a string"),
])
def test_bad_records_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GptforgeError, match=message):
        read_records(path)


def test_missing_file_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(GptforgeError, match="is a folder; name the data file in it"):
        read_records(tmp_path)


def test_records_longer_than_the_context_need_max_length():
    with pytest.raises(GptforgeError, match="record 1 is .* longer than the model's context of 16; pass --max-length"):
        InstructionData(RECORDS, context_length=16)
    data = InstructionData(RECORDS, context_length=16, max_length=16)
    assert data.batch([0, 1])[0].shape == (2, 16)
    with pytest.raises(GptforgeError, match="--max-length 17"):
        InstructionData(RECORDS, context_length=16, max_length=17)


def test_template_is_saved_with_the_model(tiny_config, tmp_path):
    from gptforge import load, save
    from gptforge.config import GPTConfig

    model = GPTModel(tiny_config())
    model.cfg = model.cfg.replace(prompt_template=ALPACA)
    assert load(save(model, tmp_path / "m")).cfg.prompt_template == ALPACA
    assert load(save(GPTModel(tiny_config()), tmp_path / "base")).cfg.prompt_template is None
    with pytest.raises(GptforgeError, match="prompt_template keys"):
        GPTConfig.from_dict({**tiny_config(), "prompt_template": {"bogus": "x"}})
    with pytest.raises(GptforgeError, match="bad prompt template"):
        GPTConfig.from_dict({**tiny_config(), "prompt_template": {"stop": [""]}})


def test_respond_stops_at_the_next_section():
    enc = get_tokenizer()
    start = len(enc.encode(ALPACA.prompt(RECORDS[1]["instruction"])))
    model = positional_model({start: enc.encode("Paris is it.\n\n### Instruction:\nMore") + [50256]})
    assert respond(model, [RECORDS[1]], max_new_tokens=20) == ["Paris is it."]
    model = positional_model({start: enc.encode(" Paris") + [50256] + enc.encode(" more")})
    assert respond(model, [RECORDS[1]], max_new_tokens=20) == ["Paris"]


def test_chat_prompt_is_the_training_format():
    from gptforge.instruct import chat_prompt

    rec = RECORDS[1]
    assert chat_prompt([{"role": "user", "content": rec["instruction"]}]) == \
        ch07.format_input(rec) + "\n\n### Response:\n"
    two = chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": [{"type": "text", "text": "c"}]}])
    assert two == ALPACA.prompt("a") + "b<|endoftext|>" + ALPACA.prompt("c")
    system = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}])
    assert system == "Be brief.\n\n### Instruction:\na\n\n### Response:\n"
    for bad in ([], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]):
        with pytest.raises(GptforgeError):
            chat_prompt(bad)
