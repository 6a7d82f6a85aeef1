import json

import pytest

from qaserve.cli import parse_filters
from qaserve.errors import BadRequest
from qaserve.loaders import load_documents


def test_jsonl_with_ids_meta_and_dedupe(tmp_path):
    p = tmp_path / "docs.jsonl"
    lines = [
        {"id": "a", "text": "first", "item_id": "X", "nested": {"no": 1}},
        {"id": "b", "text": "second", "item_id": "Y"},
        {"id": "a", "text": "first, edited", "item_id": "X"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = load_documents(p)
    assert [d.id for d in docs] == ["a", "b"]
    assert docs[0].text == "first, edited"
    assert docs[0].meta == {"item_id": "X"}  # non-scalar fields are not metadata
    only = load_documents(p, meta_fields=["item_id"])
    assert only[1].meta == {"item_id": "Y"}


def test_csv_custom_fields(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("rid,body,item,stars\n1,Great sound,A,5\n2,Poor battery,B,2\n")
    docs = load_documents(p, text_field="body", id_field="rid", meta_fields=["item"])
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("1", "Great sound", {"item": "A"}),
        ("2", "Poor battery", {"item": "B"}),
    ]


def test_txt_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Second file.")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    docs = load_documents(tmp_path)
    assert sorted(d.id for d in docs) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', "bad.jsonl:2: invalid JSON"),
        ("missing.jsonl", '{"body": "x"}\n', "no 'text' field"),
        ("empty_text.jsonl", '{"text": "   "}\n', "text"),
        ("empty.txt", "   \n", "empty"),
        ("list.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("doc.pdf", "x", "unknown file type"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        load_documents(p)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(BadRequest, match="no such file"):
        load_documents(tmp_path / "nope.jsonl")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadRequest, match="not UTF-8"):
        load_documents(p)


def test_parse_filters():
    assert parse_filters(None) is None
    assert parse_filters(["item_id=B01"]) == {"item_id": "B01"}
    assert parse_filters(["item_id=A", "item_id=B"]) == {"item_id": ["A", "B"]}
    assert parse_filters(["stars:=5", "ok:=true"]) == {"stars": 5, "ok": True}
    assert parse_filters(['ids:=["a", "b"]']) == {"ids": ["a", "b"]}
    for bad in ['x:={"a": 1}', "x:=[[1]]", "x:=null", "novalue", "=v", "x:=[]"]:
        with pytest.raises(BadRequest):
            parse_filters([bad])
