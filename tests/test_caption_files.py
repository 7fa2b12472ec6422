"""Caption stores (metadata.csv, .txt sidecars) and the caption-table helpers of the WebUI tab."""

import pytest
from PIL import Image

from lora_train.engine.data import caption_store as cf
from lora_train.engine.data import caption_text as ct

TRICKY = {
    "a.png": 'sks, a "quoted" word, commas, and more',
    "b.png": "first line\nsecond line, with comma",
    "c.png": "unicode: café – 東京",
    "d e.png": "",
}


def make_folder(tmp_path, names=("a.png", "b.png", "c.png")):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


def test_csv_round_trips_commas_quotes_newlines(tmp_path):
    path = tmp_path / "metadata.csv"
    cf.write_metadata_csv(path, TRICKY)
    assert path.read_bytes().startswith(b"filename,prompt\n")
    assert b"\r" not in path.read_bytes()
    assert cf.read_metadata_csv(path) == TRICKY
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_csv_read_accepts_bom_and_other_headers(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_bytes("\ufefffile_name,text\nx.png,hello\n".encode())
    assert cf.read_metadata_csv(path) == {"x.png": "hello"}
    path.write_text("name,words\nx.png,hello\n", encoding="utf-8")
    with pytest.raises(cf.CaptionFileError, match="metadata.csv"):
        cf.read_metadata_csv(path)
    assert cf.read_metadata_csv(tmp_path / "missing.csv") == {}


def test_list_rows_and_missing_captions_csv(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "notes.md").write_text("not an image")
    cf.write_metadata_csv(folder / "metadata.csv", {"a.png": "cat", "b.png": ""})
    rows = cf.list_rows(folder)
    assert [(r.name, r.caption) for r in rows] == [("a.png", "cat"), ("b.png", None), ("c.png", None)]
    assert rows[0].image == folder / "a.png"
    assert cf.missing_captions(rows) == ["b.png", "c.png"]


def test_list_rows_sidecar_and_recursive(tmp_path):
    folder = make_folder(tmp_path, ("a.png", "sub/b.jpg"))
    (folder / "sub" / "b.txt").write_text("dog, grass\n", encoding="utf-8")
    assert cf.detect_mode(folder) == "sidecar"
    assert [r.name for r in cf.list_rows(folder)] == ["a.png"]
    rows = cf.list_rows(folder, recursive=True)
    assert [(r.name, r.caption) for r in rows] == [("a.png", None), ("sub/b.jpg", "dog, grass")]


def test_save_captions_csv_keeps_other_rows(tmp_path):
    folder = make_folder(tmp_path)
    cf.write_metadata_csv(folder / "metadata.csv", {"a.png": "old a", "b.png": "old b"})
    written = cf.save_captions(folder, {"a.png": "new, a\nline", "c.png": "new c"})
    assert written == [folder / "metadata.csv"]
    assert cf.read_metadata_csv(folder / "metadata.csv") == {
        "a.png": "new, a\nline",
        "b.png": "old b",
        "c.png": "new c",
    }


def test_save_captions_sidecar(tmp_path):
    folder = make_folder(tmp_path)
    cf.save_captions(folder, {"b.png": "  edited caption  "}, mode="sidecar")
    assert (folder / "b.txt").read_text(encoding="utf-8") == "edited caption\n"
    assert not (folder / "metadata.csv").exists()
    assert cf.list_rows(folder, mode="sidecar")[1].caption == "edited caption"


def test_save_captions_refuses_paths_outside_folder(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    with pytest.raises(cf.CaptionFileError, match="outside"):
        cf.save_captions(folder, {"../evil.png": "x"}, mode="sidecar")
    assert not (tmp_path / "evil.txt").exists()


def test_find_replace_plain_text_is_literal():
    captions = {"a": "a.b, cat", "b": "axb, dog", "c": None, "d": "Cat"}
    assert ct.find_replace(captions, "a.b", "X") == {"a": "X, cat"}
    assert ct.find_replace(captions, "cat", "kitten") == {"a": "a.b, kitten"}
    assert ct.find_replace(captions, "cat", "kitten", case_sensitive=False) == {"a": "a.b, kitten", "d": "kitten"}
    assert ct.find_replace(captions, "cat", r"\1") == {"a": r"a.b, \1"}  # no regex meaning in plain mode
    assert ct.find_replace(captions, "", "x") == {}


def test_find_replace_regex_and_tidy():
    captions = {"a": "sks, red hair, blue eyes", "b": "red car"}
    assert ct.find_replace(captions, r"(\w+) hair", r"\1-haired", regex=True) == {"a": "sks, red-haired, blue eyes"}
    assert ct.find_replace(captions, "red hair", "") == {"a": "sks, blue eyes"}  # no empty tag left
    with pytest.raises(cf.CaptionFileError, match="Invalid regular expression"):
        ct.find_replace(captions, "(", "", regex=True)


def test_tag_frequency_counts_and_sorts():
    captions = ["sks, Cat, red", "sks, cat, cat, blue", "sks, dog", None, ""]
    assert ct.tag_frequency(captions) == [("sks", 3), ("Cat", 2), ("blue", 1), ("dog", 1), ("red", 1)]
    assert ("cat", 1) in ct.tag_frequency(captions, case_sensitive=True)


def test_non_utf8_sidecar_names_the_file_in_the_tab_table(tmp_path):
    folder = make_folder(tmp_path, ("a.png", "b.png"))
    (folder / "a.txt").write_text("fine")
    (folder / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(cf.CaptionFileError, match=r"b\.txt is not UTF-8 text .*re-save it as UTF-8"):
        cf.list_rows(folder)


def test_non_utf8_csv_names_the_file(tmp_path):
    folder = make_folder(tmp_path, ("a.png",))
    (folder / "metadata.csv").write_bytes("filename,prompt\na.png,caf\xe9\n".encode("cp1252"))
    with pytest.raises(cf.CaptionFileError, match=r"metadata\.csv is not UTF-8 text"):
        cf.list_rows(folder)


@pytest.mark.parametrize(("caption", "expected"), [
    ("a cat", "sks, a cat"),
    ("sks, a cat", "sks, a cat"),
    ("a cat, SKS", "sks, a cat"),
    ("", "sks"),
])
def test_one_trigger_rule_for_captioner_and_trainer(caption, expected):
    from lora_train.caption.assemble import assemble_caption

    assert ct.with_trigger(caption, "sks") == expected
    assert assemble_caption("sks", caption, [], lambda text: 0) == expected
    assert ct.with_trigger(caption, None) == caption
