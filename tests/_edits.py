"""Test helper: edit a data file in place so that only its content differs (same byte size, same mtime)."""

import os


def same_size_edit(path, old: str, new: str) -> None:
    """Replace text by text of the same byte length and keep the modification time: only the content differs."""
    assert len(old.encode()) == len(new.encode())
    st = os.stat(path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
