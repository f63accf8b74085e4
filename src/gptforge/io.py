"""Files written whole or not at all, their hashes, and the safetensors reader.

Below everything that writes files (checkpoints, token files, training logs): imports nothing of
gptforge but its error type.
Every write goes to a temporary name, is fsynced and then renamed into place, so a crash leaves
either the old file (or directory) or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import GptforgeError

def _umask() -> int:
    """The process umask, read at the time of the write (it may change after import) and without
    changing it where the system shows it (/proc on Linux); elsewhere os.umask's set-and-restore.

    mkstemp/mkdtemp create private (0600/0700) files and folders; what we publish by renaming them
    gets the permissions an ordinary open()/mkdir() would have: 0666/0777 less this umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def ensure_dir(folder: str | Path) -> Path:
    """Create `folder` and its parents for output; a path that cannot be a folder (a file in the
    way, no permission, a read-only disk) is the user's error, named, not an OSError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            also = "" if blocker == folder else f", so {folder} cannot be created"
            raise GptforgeError(f"{blocker} is a file, not a folder{also}; choose another output path") from None
        raise GptforgeError(f"cannot create the folder {folder} ({err.strerror or err}); choose another "
                            "output path") from None
    return folder


def _temp_in(folder: Path, make: Callable[[], str]) -> str:
    """mkstemp/mkdtemp in an output folder; one we may not write in is the user's error."""
    try:
        return make()
    except OSError as err:
        raise GptforgeError(f"cannot write in {folder} ({err.strerror or err}); choose another output "
                            "path") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write one file atomically: `write(tmp_path)` fills a temporary file beside `path`, which is
    fsynced and renamed over `path`. On any error the temporary file is removed and `path` is
    left as it was. Returns `path`."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp_name = _temp_in(path.parent, lambda: tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                                                 dir=path.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` for bytes already in memory (a JSON file, a small state)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))



@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, replaceable: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary directory beside `out_dir`; when
    the block ends without error its files are fsynced and it replaces `out_dir` (an existing
    `out_dir` is moved aside first and deleted last, so a crash leaves one complete copy).
    An existing `out_dir` is only replaced when it holds nothing but files named in
    `replaceable`, so a mistyped path never deletes a project directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GptforgeError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in replaceable or not p.is_file())
        if others:
            raise GptforgeError(f"{out_dir} exists and holds other things than a checkpoint ({short_list(others)}); "
                             f"refusing to replace it: choose a new or empty directory")
    ensure_dir(out_dir.parent)
    tmp = Path(_temp_in(out_dir.parent, lambda: tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp",
                                                                dir=out_dir.parent)))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~_umask())  # safetensors, like mkstemp, writes 0600 files
            _fsync_file(file)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return sha256_of(f, chunk_bytes)


def sha256_of(f: BinaryIO, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of an open binary file from its start (the handle is left at its end)."""
    digest = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def read_hashed(f: BinaryIO, chunk_bytes: int = 16 << 20) -> tuple[memoryview, str]:
    """An open binary file's bytes, all of it from its start, in memory (writable, not zeroed
    first), and their hex sha256. Each chunk is hashed on a second thread while the next is read
    (hashlib and readinto both let go of the GIL): sha256 alone runs at ~1.8 GB/s, so reading the
    file after hashing it cost half as long again. Raises GptforgeError if the file shrinks meanwhile."""
    size = os.fstat(f.fileno()).st_size
    data = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    digest = hashlib.sha256()
    f.seek(0)
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashing = None
        for start in range(0, size, chunk_bytes):
            chunk = data[start:start + chunk_bytes]
            if f.readinto(chunk) != len(chunk):
                raise GptforgeError(f"{getattr(f, 'name', 'the file')} shrank while it was read")
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(digest.update, chunk)
        if hashing is not None:
            hashing.result()
    return data, digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Safetensors, read with one copy: each tensor is allocated once and filled with readinto, or is a
# view of the file's bytes already in memory (a verified checkpoint's), so the peak is the weights
# plus nothing (no mmap pages counted twice, no intermediate buffers).

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path, keep: Callable[[str], bool] = lambda name: True,
                     dtype: torch.dtype | None = None, mapped: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose names pass `keep`, on the CPU, converted to `dtype`
    (floating tensors only) when given. Raises ValueError for a truncated or malformed file.
    mapped: tensors are copy-on-write views of the file memory-mapped (nothing read until used,
    as transformers loads), for files without a checksum to verify first."""
    path = Path(path)
    with open(path, "rb") as f:
        return read_safetensors_from(f, path, keep, dtype, mapped)


def read_safetensors_from(f: BinaryIO | None, path: Path, keep: Callable[[str], bool],
                          dtype: torch.dtype | None, mapped: bool = False,
                          data: memoryview | None = None) -> dict[str, torch.Tensor]:
    """`read_safetensors` from an open handle (one already checksummed), or from `data`, the
    whole file already in memory (`read_hashed`'s), whose tensors are then views; `path` names
    it in errors."""
    size = len(data) if data is not None else os.fstat(f.fileno()).st_size

    def read(start: int, n: int) -> bytes:
        if data is not None:
            return bytes(data[start:start + n])
        f.seek(start)
        return f.read(n)

    head = read(0, 8)
    if len(head) < 8:
        raise GptforgeError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise GptforgeError(f"{path} is truncated or not a safetensors file: its header claims "
                         f"{header_len} bytes but the file has {size}")
    try:
        header = json.loads(read(8, header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptforgeError(f"{path} is corrupted: its safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise GptforgeError(f"{path} is corrupted: its safetensors header is not a JSON object")
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    source = data  # what the tensors are views of, if anything
    for name, info in header.items():
        if name == "__metadata__" or not keep(name):
            continue
        try:
            file_dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GptforgeError(f"{path} is corrupted: bad header entry for tensor {name!r}") from None
        if base + end > size:
            raise GptforgeError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} "
                             f"but the file has {size} bytes; save or download it again")
        item = torch.empty((), dtype=file_dtype).element_size()
        nbytes = math.prod(shape) * item
        if nbytes != end - begin or begin < 0:
            raise GptforgeError(f"{path} is corrupted: tensor {name!r} of shape {shape} needs "
                             f"{nbytes} bytes, its header gives {end - begin}")
        if (mapped or source is not None) and nbytes and (base + begin) % item == 0:  # else (unaligned) a copy
            if source is None:  # private pages: writing a tensor never writes the file
                source = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            tensors[name] = _maybe_to(
                torch.frombuffer(source, dtype=file_dtype, count=nbytes // item, offset=base + begin).view(shape), dtype)
            continue
        tensor = torch.empty(shape, dtype=file_dtype)
        if nbytes:
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            if data is not None:
                view[:] = data[base + begin:base + end]
            else:
                f.seek(base + begin)
                if f.readinto(view) != nbytes:
                    raise GptforgeError(f"{path} is truncated in tensor {name!r}")
        tensors[name] = _maybe_to(tensor, dtype)
    return tensors


def _maybe_to(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating and one is given, else as it is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (made contiguous, on the CPU) to a safetensors file (not atomic by itself)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------------


def short_list(names: list[str], limit: int = 6) -> str:
    """`names` joined for an error message, the first `limit` of them and a count."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
