"""Uploads into a new dataset folder: zips cannot escape, only images/captions land, limits hold."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from lora_train.webui.uploads import Limits, UploadError, import_upload


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def test_images_captions_and_zip_with_subfolders(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(_png())
    caption = tmp_path / "a.txt"
    caption.write_text("red square", encoding="utf-8")
    archive = _zip(tmp_path / "set.zip", {"10_cat/b.png": _png(), "10_cat/b.txt": b"cat", "notes.exe": b"MZ",
                                          "__MACOSX/._b.png": b"junk", "dir/": b""})
    report = import_upload([image, caption, archive], tmp_path / "ds")
    assert sorted(report.written) == ["10_cat/b.png", "10_cat/b.txt", "a.png", "a.txt"]
    assert (tmp_path / "ds" / "10_cat" / "b.txt").read_text() == "cat"
    assert not (tmp_path / "ds" / "notes.exe").exists()
    assert any("notes.exe" in s for s in report.skipped)


@pytest.mark.parametrize("evil", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png", "..\\evil.png"])
def test_zip_entries_outside_the_folder_refuse_the_whole_zip(tmp_path: Path, evil: str) -> None:
    archive = _zip(tmp_path / "evil.zip", {"ok.png": _png(), evil: _png()})
    with pytest.raises(UploadError, match="outside the dataset folder"):
        import_upload([archive], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    assert not (tmp_path / "evil.png").exists()


def test_zip_symlink_entries_are_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "link.zip", {"ok.png": _png()}, symlink="link.png")
    with pytest.raises(UploadError, match="outside"):
        import_upload([archive], tmp_path / "ds")


def test_count_and_size_limits(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"{i}.png": _png() for i in range(5)})
    with pytest.raises(UploadError, match="more than 3 files"):
        import_upload([archive], tmp_path / "ds1", Limits(max_files=3))
    bomb = _zip(tmp_path / "bomb.zip", {"big.png": b"\0" * (3 << 20)})
    with pytest.raises(UploadError, match="per file"):
        import_upload([bomb], tmp_path / "ds2", Limits(max_file_bytes=1 << 20))
    with pytest.raises(UploadError, match="in total"):
        import_upload([archive], tmp_path / "ds3", Limits(max_total_bytes=len(_png()) * 2))
    assert not any((tmp_path / f"ds{i}").exists() for i in (1, 2, 3))


def test_lying_zip_header_is_caught_by_counting_real_bytes(tmp_path: Path) -> None:
    path = _zip(tmp_path / "liar.zip", {"big.png": b"\0" * (2 << 20)})
    original = zipfile.ZipFile.infolist

    def shrunk(self):
        infos = original(self)
        for info in infos:
            info.file_size = 10
        return infos

    zipfile.ZipFile.infolist = shrunk
    try:
        with pytest.raises(UploadError, match="per file|corrupt"):
            import_upload([path], tmp_path / "ds", Limits(max_file_bytes=1 << 20))
        assert not (tmp_path / "ds").exists()
    finally:
        zipfile.ZipFile.infolist = original


def test_bad_zip_no_images_and_existing_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UploadError, match="not a readable zip"):
        import_upload([bad], tmp_path / "ds")
    text = tmp_path / "only.txt"
    text.write_text("x")
    with pytest.raises(UploadError, match="no images"):
        import_upload([text], tmp_path / "ds")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UploadError, match="already has files"):
        import_upload([text], tmp_path / "full")
