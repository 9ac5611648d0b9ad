"""Calibration and evaluation data: sampling windows from text files, passing token tensors through, clear errors."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

import llm_sparsify.models
from llm_sparsify.data import DataError, calibration_ids, evaluation_ids, load_documents

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "quick", "brown", "foxes", "jumped", "over",
         "lazy", "dogs", "near", "river", "banks", "and", "old", "mills", "under", "grey", "skies"]


def prose(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(llm_sparsify.models.default_model_path())


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def is_slice(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[i : i + n] == window for i in range(len(ids) - n + 1))


def check_shape(ids: torch.Tensor, nsamples: int, seqlen: int) -> None:
    assert isinstance(ids, torch.Tensor)
    assert ids.shape == (nsamples, seqlen)
    assert ids.dtype == torch.long


# --- text files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_text():
    return prose(400, seed=0)


@pytest.fixture
def txt_file(tmp_path, long_text):
    path = tmp_path / "calib.txt"
    path.write_text(long_text, encoding="utf-8")
    return path


def test_txt_file_gives_windows_of_the_text(txt_file, long_text, tokenizer):
    ids = calibration_ids(txt_file, tokenizer, nsamples=5, seqlen=16, seed=0)
    check_shape(ids, 5, 16)
    source = token_ids(tokenizer, long_text)
    assert len(source) > 100
    for window in ids.tolist():
        assert is_slice(window, source)
    assert len({tuple(w) for w in ids.tolist()}) > 1  # not the same window five times


def test_txt_file_accepts_a_string_path(txt_file, tokenizer):
    assert torch.equal(calibration_ids(str(txt_file), tokenizer, 3, 8, seed=1),
                       calibration_ids(txt_file, tokenizer, 3, 8, seed=1))


def test_same_seed_same_ids_different_seed_different_ids(txt_file, tokenizer):
    first = calibration_ids(txt_file, tokenizer, nsamples=4, seqlen=16, seed=0)
    again = calibration_ids(txt_file, tokenizer, nsamples=4, seqlen=16, seed=0)
    other = calibration_ids(txt_file, tokenizer, nsamples=4, seqlen=16, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_windows_never_run_past_the_end(tmp_path, tokenizer):
    text = prose(40, seed=3)
    source = token_ids(tokenizer, text)
    seqlen = len(source) - 2  # at most two start positions
    path = tmp_path / "short.txt"
    path.write_text(text)
    ids = calibration_ids(path, tokenizer, nsamples=20, seqlen=seqlen, seed=0)
    check_shape(ids, 20, seqlen)
    for window in ids.tolist():
        assert window in (source[:seqlen], source[1 : seqlen + 1])


def test_too_short_text_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one window of 64"):
        calibration_ids(path, tokenizer, nsamples=2, seqlen=64)


def test_text_exactly_one_window_long_is_too_short(tmp_path, tokenizer):
    # a window needs seqlen tokens and the reference sampling draws starts in [0, len - seqlen - 1]
    text = prose(30, seed=4)
    n = len(token_ids(tokenizer, text))
    path = tmp_path / "exact.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=f"has {n} tokens"):
        calibration_ids(path, tokenizer, nsamples=1, seqlen=n)


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 16), (-1, 16), (4, 1), (4, 0)])
def test_bad_sizes_are_a_data_error(txt_file, tokenizer, nsamples, seqlen):
    with pytest.raises(DataError, match="need nsamples >= 1 and seqlen >= 2"):
        calibration_ids(txt_file, tokenizer, nsamples, seqlen)


# --- jsonl files ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents():
    long_docs = [prose(60 + 10 * i, seed=10 + i) for i in range(3)]
    return long_docs, ["short one.", "tiny", ""]


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def test_jsonl_samples_windows_inside_long_documents(tmp_path, documents, tokenizer):
    long_docs, short_docs = documents
    path = write_jsonl(tmp_path / "calib.jsonl", [short_docs[0], long_docs[0], short_docs[1], long_docs[1],
                                                  short_docs[2], long_docs[2]])
    ids = calibration_ids(path, tokenizer, nsamples=12, seqlen=16, seed=0)
    check_shape(ids, 12, 16)
    encoded = [token_ids(tokenizer, doc) for doc in long_docs]
    assert all(len(e) > 16 for e in encoded)
    used = set()
    for window in ids.tolist():
        homes = [i for i, e in enumerate(encoded) if is_slice(window, e)]
        assert homes, "every window must lie inside one long document (windows never span documents)"
        used.update(homes)
    assert len(used) >= 2  # documents are drawn at random, not always the first


def test_jsonl_short_documents_fall_back_to_the_joined_stream(tmp_path, tokenizer):
    docs = [prose(5, seed=20 + i) for i in range(12)]
    assert all(len(token_ids(tokenizer, d)) < 12 for d in docs)
    path = write_jsonl(tmp_path / "short.jsonl", docs)
    ids = calibration_ids(path, tokenizer, nsamples=4, seqlen=12, seed=0)
    check_shape(ids, 4, 12)
    stream = token_ids(tokenizer, "\n\n".join(docs))
    for window in ids.tolist():
        assert is_slice(window, stream)


def test_jsonl_gz_and_json_array(tmp_path, documents, tokenizer):
    long_docs, _ = documents
    gz = write_jsonl(tmp_path / "calib.jsonl.gz", long_docs, opener=gzip.open)
    array = tmp_path / "calib.json"
    array.write_text(json.dumps([{"text": d} for d in long_docs]))
    plain = write_jsonl(tmp_path / "calib.jsonl", long_docs)
    assert load_documents(gz) == long_docs
    assert load_documents(array) == long_docs
    expected = calibration_ids(plain, tokenizer, 3, 16, seed=5)
    assert torch.equal(calibration_ids(gz, tokenizer, 3, 16, seed=5), expected)
    assert torch.equal(calibration_ids(array, tokenizer, 3, 16, seed=5), expected)


def test_jsonl_record_without_text_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": prose(50, 1)}) + "\n" + json.dumps({"content": "no text here"}) + "\n")
    with pytest.raises(DataError, match='every record needs a "text" field'):
        calibration_ids(path, tokenizer, nsamples=2, seqlen=8)


def test_jsonl_record_that_is_not_an_object_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('"just a string"\n')
    with pytest.raises(DataError, match='"text" field'):
        calibration_ids(path, tokenizer, nsamples=2, seqlen=8)


# --- missing sources --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope.txt", "nope.jsonl", "missing/file.jsonl.gz"])
def test_nonexistent_file_is_a_data_error(tmp_path, monkeypatch, tokenizer, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        calibration_ids(name, tokenizer, nsamples=2, seqlen=8)


def test_nonexistent_path_in_an_existing_directory_is_a_data_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        calibration_ids(str(tmp_path / "calibration"), tokenizer, nsamples=2, seqlen=8)


# --- token tensors ----------------------------------------------------------------------------------------------


def test_long_tensor_passes_through_unchanged():
    ids = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    result = calibration_ids(ids, None, nsamples=128, seqlen=2048)  # sizes are the tensor's own
    assert result is ids
    check_shape(result, 3, 7)


def test_pt_file_passes_through_unchanged(tmp_path):
    ids = torch.randint(0, 1000, (4, 9), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "calib.pt"
    torch.save(ids, path)
    for source in (path, str(path)):
        result = calibration_ids(source, None, nsamples=128, seqlen=2048)
        check_shape(result, 4, 9)
        assert torch.equal(result, ids)


@pytest.mark.parametrize(
    "ids",
    [torch.zeros(8, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 8),
     torch.zeros(2, 8, dtype=torch.int32)],
    ids=["1d", "3d", "float", "int32"],
)
def test_wrong_tensor_is_a_data_error(tmp_path, ids):
    with pytest.raises(DataError, match=r"LongTensor \[nsamples, seqlen\]"):
        calibration_ids(ids, None, 2, 8)
    path = tmp_path / "bad.pt"
    torch.save(ids, path)
    with pytest.raises(DataError, match="LongTensor"):
        calibration_ids(path, None, 2, 8)


def test_pt_file_that_holds_no_tensor_is_a_data_error(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"ids": torch.zeros(2, 8, dtype=torch.long)}, path)
    with pytest.raises(DataError, match="LongTensor"):
        calibration_ids(path, None, 2, 8)


# --- bundled corpora --------------------------------------------------------------------------------------------


def test_bundled_c4_has_1000_documents():
    docs = load_documents("c4")
    assert len(docs) == 1000
    assert all(isinstance(d, str) for d in docs)
    assert sum(1 for d in docs if d.strip()) == 1000


def test_bundled_wikitext2_test_split():
    rows = load_documents("wikitext2", "test")
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert all(r == "" or r.endswith("\n") for r in rows)  # rows as the HF dataset has them
    assert rows[1].startswith(" = Robert Boulter = ")


def test_calibration_from_bundled_c4(tokenizer):
    ids = calibration_ids("c4", tokenizer, nsamples=2, seqlen=32, seed=0)
    check_shape(ids, 2, 32)
    assert ids.min() >= 0 and ids.max() < len(tokenizer)
    assert torch.equal(ids, calibration_ids("c4", tokenizer, nsamples=2, seqlen=32, seed=0))


def test_evaluation_ids_of_a_text_file(txt_file, long_text, tokenizer):
    ids = evaluation_ids(txt_file, tokenizer)
    assert ids.dim() == 2 and ids.shape[0] == 1
    assert ids[0].tolist() == token_ids(tokenizer, long_text)


# --- bad input found in review: each ends in a clear error ---------------------------------------------------


def test_nonexistent_pt_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        calibration_ids(tmp_path / "nope.pt", None, 2, 8)


def test_malformed_jsonl_line_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\nnot json at all\n')
    with pytest.raises(DataError):
        calibration_ids(path, tokenizer, 2, 8)


def test_blank_text_is_a_data_error(tmp_path, tokenizer):
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n")
    with pytest.raises(DataError):
        calibration_ids(path, tokenizer, nsamples=1, seqlen=8)
