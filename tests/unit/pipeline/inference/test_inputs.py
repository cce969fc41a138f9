"""The input stream: order, recursion, globs, lists, and a record for what names nothing."""
from pipeline.inference.inputs import Source, iter_inputs


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return str(p)


def test_folders_globs_lists_in_order_with_error_inputs(tmp_path):
    a = _touch(tmp_path / "d" / "b.png")
    b = _touch(tmp_path / "d" / "a.JPG")
    c = _touch(tmp_path / "d" / "sub" / "c.mp4")
    _touch(tmp_path / "d" / "notes.txt")
    _touch(tmp_path / "d" / ".hidden" / "h.png")
    (tmp_path / "empty").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n\n{a}\n{tmp_path / 'gone.png'}\n")
    ignored = [0]
    got = list(iter_inputs([Source(str(tmp_path / "d")), Source(str(tmp_path / "empty")),
                            Source(str(tmp_path / "d" / "*.png")), Source(str(tmp_path / "*.webp")),
                            Source(str(lst), is_list=True)], ignored))
    assert [(i.index, i.path, i.kind, i.error) for i in got] == [
        (0, b, "image", None), (1, a, "image", None), (2, c, "video", None),
        (3, str(tmp_path / "empty"), "error", "empty_folder"),
        (4, a, "image", None),
        (5, str(tmp_path / "*.webp"), "error", "no_match"),
        (6, a, "image", None), (7, str(tmp_path / "gone.png"), "error", "missing")]
    assert ignored == [1]  # notes.txt; the hidden folder is not walked


def test_explicit_file_with_any_extension_is_tried(tmp_path):
    f = _touch(tmp_path / "photo.heic")
    assert [(i.kind, i.error) for i in iter_inputs([Source(f)])] == [("image", None)]


def test_recursive_glob(tmp_path):
    a = _touch(tmp_path / "s" / "x" / "1.png")
    b = _touch(tmp_path / "s" / "2.png")
    got = [i.path for i in iter_inputs([Source(str(tmp_path / "s" / "**" / "*.png"))])]
    assert got == sorted([a, b])
