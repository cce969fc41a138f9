"""The COT annotation file is read one record at a time (sharding/json_stream.py):
the same elements as json.loads, named errors, a bound per element, and memory
of one block rather than the file (issue 25, item 5)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from sharding.json_stream import JSONStreamError, iter_json_array

VALUES = [1, 23456789, -1.5e3, 'a]b,c\\"d', {"k": ["é", "😀", {"n": None}]}, None, True, [], {}, [[1, [2]], "]"],
          "x" * 50, 0.1]


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_the_elements_are_those_of_json_loads_whatever_the_block_size(tmp_path, block):
    path = tmp_path / "a.json"
    path.write_text(" \n[ " + " ,\n ".join(json.dumps(v, ensure_ascii=False) for v in VALUES) + " ]\n",
                    encoding="utf-8")
    assert list(iter_json_array(str(path), block_bytes=block)) == json.loads(path.read_text(encoding="utf-8"))
    (tmp_path / "e.json").write_text("[ ]")
    assert list(iter_json_array(str(tmp_path / "e.json"), block_bytes=block)) == []


@pytest.mark.parametrize("text,message", [
    ('{"a": 1}', "top level is not a list"),
    ('[1, 2', "expected ',' or ']' after element 1"),
    ('[1, {"a": ', "element 1 at character 4"),
    ('[1, 2,]', "element 2"),
    ('[1] [2]', "extra data after the list"),
    ('[1 2]', "expected ',' or ']' after element 0"),
])
def test_malformed_files_are_named_errors(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(JSONStreamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(iter_json_array(str(path), block_bytes=3))


def test_an_element_over_the_bound_is_refused_without_reading_on(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"a": 1}, {"text": "y" * 5000}, {"b": 2}]))
    with pytest.raises(JSONStreamError, match=r"element 1 at character \d+ is longer than 1000 characters"):
        list(iter_json_array(str(path), max_element_chars=1000, block_bytes=256))


def test_reading_the_cot_file_holds_records_not_the_file(tmp_path):
    """17 MB of records that are all rejected (no conclusion): what stays is the
    rejections, so the peak shows what reading cost. json.loads of the whole file
    held its bytes and its text at once (about twice the file)."""
    from sharding.mmfr import COT_FILE, MMFRScan, _read_cot

    record = {"image": "diffusiondb/p/x.png",
              "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "z" * 2000}]}
    with open(tmp_path / COT_FILE, "w", encoding="utf-8") as fh:
        fh.write("[" + ",".join(json.dumps({**record, "id": i}) for i in range(8000)) + "]")
    size = (tmp_path / COT_FILE).stat().st_size
    scan = MMFRScan()
    tracemalloc.start()
    try:
        assert _read_cot(str(tmp_path), scan, strict=False) == {}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.records_seen == 8000 and len(scan.rejected["train"]) == 8000
    assert peak < size / 2, (peak, size)
