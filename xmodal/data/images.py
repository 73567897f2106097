"""Image references: a file path, or a member of a tar shard (`SHARD::OFFSET+SIZE`), opened the same way.

Evaluation sets read from webdataset shards name each image by where its bytes lie in the shard, so every image
loader (retrieval encoding, zero-shot, prompt evaluation) reads files and shard members through `open_rgb`.
"""

from __future__ import annotations

import io
import os
import re

MEMBER = re.compile(r"(?P<shard>.+)::(?P<offset>\d+)\+(?P<size>\d+)")


def member_ref(shard: str | os.PathLike, offset: int, size: int) -> str:
    """The reference of the `size` bytes at `offset` of tar file `shard` (a member's data)."""
    return f"{os.fspath(shard)}::{int(offset)}+{int(size)}"


def parse_member_ref(ref: str) -> tuple[str, int, int] | None:
    """(shard, offset, size) of a member reference; None for a plain path (unless that path exists as a file)."""
    m = MEMBER.fullmatch(str(ref))
    if m is None or os.path.isfile(ref):
        return None
    return m.group("shard"), int(m.group("offset")), int(m.group("size"))


def ref_file(ref: str) -> str:
    """The file on disk that holds the image: the shard of a member reference, else the path itself."""
    member = parse_member_ref(ref)
    return member[0] if member else str(ref)


def image_exists(ref: str) -> bool:
    """Whether the image's file (or its shard) exists and the member lies inside it."""
    member = parse_member_ref(ref)
    if member is None:
        return os.path.isfile(ref)
    shard, offset, size = member
    return os.path.isfile(shard) and offset + size <= os.path.getsize(shard)


def read_image_bytes(ref: str) -> bytes:
    """The encoded bytes of an image file or shard member (OSError when they cannot be read in full)."""
    member = parse_member_ref(ref)
    if member is None:
        with open(ref, "rb") as f:
            return f.read()
    shard, offset, size = member
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard} ends before the member at byte {offset} (+{size}); the shard is truncated")
    return data


def open_rgb(ref: str):
    """The image at `ref` as an RGB PIL image, decoded now; raises what PIL raises for unreadable data."""
    from PIL import Image

    member = parse_member_ref(ref)
    if member is None:
        with Image.open(ref) as im:
            return im.convert("RGB")
    with Image.open(io.BytesIO(read_image_bytes(ref))) as im:
        return im.convert("RGB")


__all__ = ["image_exists", "member_ref", "open_rgb", "parse_member_ref", "read_image_bytes", "ref_file"]
