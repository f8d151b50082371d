"""Writing an output folder atomically: build it beside the target, then rename it into place.

Why beside: a rename is atomic only inside one file system, and the parent of `out` is on
the same one as `out`. With `force`, an existing folder is swapped with the new one by
`renameat2(RENAME_EXCHANGE)` where the kernel has it (one atomic step: readers see the old
folder or the new one, never neither); elsewhere the old folder is renamed aside first,
leaving a window of microseconds in which `out` does not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the platform cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success move it to `out`, else delete it.

    Refuses an existing `out` unless `force` (checked before any work and again at the end).
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            if not force:
                raise FileExistsError(f"{out}: appeared while exporting; pass --force to replace it")
            if _exchange(tmp, out):
                shutil.rmtree(tmp)  # tmp now holds the old folder
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "x")
                os.rename(tmp, out)
                shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors 0600 files; give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


_DTYPES = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("float64"): "F64",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("bool"): "BOOL",
}


def write_safetensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Tensors (any strides) -> a safetensors file, streamed one tensor at a time.

    Why not `safetensors.numpy.save_file`: it first turns every tensor into a bytes copy, so
    an L/14 export held the params, their transposed copies and those bytes at once (~3x the
    weights). Here each tensor is made contiguous only while it is written. The layout is
    the safetensors format (little-endian u64 header length, JSON header with dtype, shape
    and data_offsets, then the raw data), header padded to 8 bytes as the reference writer
    does. Metadata defaults to `format: pt`: transformers 4.37 refuses files without it.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, value in tensors.items():
        if value.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {value.dtype} not supported")
        nbytes = int(value.size) * value.dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for value in tensors.values():
            if value.dtype.byteorder == ">":
                value = value.astype(value.dtype.newbyteorder("<"))
            fh.write(np.require(value, requirements="C").reshape(-1).data)
