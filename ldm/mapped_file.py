"""Checkpoint tensors as views of a private mapping of their file, and giving their pages back once read.

A model is filled from its checkpoint one tensor at a time (`ldm.checkpoint.load_state_dict_into`). A mapped
source tensor takes no memory until it is read; once it has been copied, `FilePages.release` drops its pages
again, so the file never becomes resident as a whole. The mapping is private and the loader only reads it, so
its pages are clean: dropping one is safe, and a later read maps it in again from the file. Releasing is
Linux only (`file_pages` returns None elsewhere).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable

import torch

#: safetensors dtype names this reader maps; a file with any other dtype is read eagerly by the caller.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file as views of one private mapping of it (nothing is read yet), or None
    when it holds a dtype outside SAFETENSORS_DTYPES. The caller has validated the file (`safe_open`)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    if any(entry["dtype"] not in SAFETENSORS_DTYPES for entry in header.values()):
        return None
    whole = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=os.path.getsize(path))
    start = 8 + header_size
    tensors = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = torch.empty(0, dtype=torch.uint8).set_(whole[start + begin:start + end])  # its own storage
        tensors[key] = raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors


class FilePages:
    """The address range [start, end) of a private mapping of a checkpoint file. Release only tensors that
    nothing has written to (a written page is private: dropping it would undo the write)."""

    #: Also released on either side of a tensor: a fault maps in file pages around it too (fault-around, and
    #: whole large folios of the page cache), so reading one tensor makes parts of its neighbours resident.
    MARGIN = 2 * 1024 * 1024

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of `tensor`'s storage and of the margin around it, if that storage lies in
        this mapping (a page of a tensor not read yet is simply read again)."""
        storage = tensor.untyped_storage()
        low, high = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if tensor.device.type != "cpu" or low < self.start or high > self.end:
            return
        low = max(self.start, (low - self.MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE)
        high = min(self.end, -(-(high + self.MARGIN) // mmap.PAGESIZE) * mmap.PAGESIZE)
        _libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), mmap.MADV_DONTNEED)


def file_pages(path: str | os.PathLike, tensors: Iterable[torch.Tensor]) -> FilePages | None:
    """The private mapping of `path` that holds every one of `tensors`, checked in /proc/self/maps; None if
    there is none (tensors read into memory) or on other systems."""
    storages = [t.untyped_storage() for t in tensors]
    spans = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages if s.nbytes()]
    if not sys.platform.startswith("linux") or not spans:
        return None
    low, high = min(a for a, _ in spans), max(b for _, b in spans)
    stat = os.stat(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # start-end perms offset major:minor inode [path]
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if (start <= low and high <= end and fields[1].endswith("p") and int(fields[4]) == stat.st_ino
                    and (major, minor) == (os.major(stat.st_dev), os.minor(stat.st_dev))):
                return FilePages(start, end)
    return None


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
