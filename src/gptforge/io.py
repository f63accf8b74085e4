"""Files written whole or not at all, locks, their hashes, and the safetensors reader.

Below everything that writes files (checkpoints, token files, training logs): imports nothing of
gptforge but its error types.
Every write goes to a unique temporary name, is fsynced and then renamed into place, so a crash
leaves either the old file (or directory) or the new one, never half of one. A writer holds a lock
beside its target while it writes: concurrent writers of one target take turns, and temporary
files a killed writer left behind are removed by the next one. Appends (`append_line`) add a
whole line or nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import GptforgeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (writes stay atomic, writers are not serialised)
    fcntl = None

# mkstemp/mkdtemp create private (0600/0700) files and folders; what we publish by renaming them
# gets the permissions an ordinary open()/mkdir() would have: 0666/0777 less the process umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


def refuse_dangling_link(path: Path) -> None:
    """An output path (or a folder above it) that is a symbolic link to nothing is the user's error,
    named (writing through it would fail, or replace the link)."""
    for part in (path, *path.parents):
        if part.is_symlink() and not part.exists():
            raise GptforgeError(f"{part} is a symbolic link to {os.readlink(part)}, which does not exist; create "
                                "that folder or choose another output path")


def ensure_dir(folder: str | Path) -> Path:
    """Create `folder` and its parents for output; a path that cannot be a folder (a file in the
    way, no permission, a read-only disk) is the user's error, named, not an OSError."""
    folder = Path(folder)
    refuse_dangling_link(folder)
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


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = True, what: str | Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock (flock) on the file `path` for the block; the file is created,
    holds the holder's process id, and is removed on release. The kernel drops the lock of a
    process that dies (even by kill -9), so a lock left by a dead process never blocks.
    wait: block until the holder releases it; else a GptforgeError says that `what` is in use and
    by which process. Where the filesystem has no locks, the block runs unlocked."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_UMASK)
        except OSError as err:
            raise GptforgeError(f"cannot write in {path.parent} ({err.strerror or err}); choose another output "
                                "path") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise GptforgeError(f"{what or path} is in use by another gptforge process"
                                f"{' (process ' + holder + ')' if holder.isdigit() else ''}; wait for it to end, "
                                "or choose another path") from None
        except OSError:  # no locks on this filesystem (some network mounts): go on unlocked
            pass
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have removed the file between our open and our lock
            current = os.stat(path)
            mine = os.fstat(fd)
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the id is for messages only (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: whoever opens the name next gets a new file
        os.close(fd)


def _lock_beside(target: Path) -> contextlib.AbstractContextManager:
    """The writers' lock of `target`: a hidden file beside it, waited for."""
    return exclusive_lock(target.parent / f".{target.name}.lock", wait=True)


def _remove_stale(target: Path) -> None:
    """Remove what writers of `target` killed mid-write left beside it (their temporary and set-aside
    copies). Called under `_lock_beside(target)`: no live writer's files are there."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")  # mkstemp/mkdtemp names
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if pattern.fullmatch(entry.name):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _name_target(err: BaseException, tmp: Path, target: Path) -> None:
    """An OSError about the temporary copy (or about no file: a failed write) names the path the
    user asked for instead."""
    if not isinstance(err, OSError):
        return
    name = str(err.filename) if err.filename is not None else str(tmp)
    if name == str(tmp) or name.startswith(str(tmp) + os.sep):
        err.filename = str(target) + name[len(str(tmp)):]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write one file atomically: `write(tmp_path)` fills a temporary file beside `path`, which is
    fsynced and renamed over `path`. On any error the temporary file is removed and `path` is
    left as it was. Returns `path`."""
    path = Path(path)
    ensure_dir(path.parent)
    with _lock_beside(path):
        _remove_stale(path)
        fd, tmp_name = _temp_in(path.parent, lambda: tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                                                     dir=path.parent))
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
            write_file(tmp, lambda: write(tmp))
            _fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            _name_target(err, tmp, path)
            raise
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` for bytes already in memory (a JSON file, a small state)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def append_line(path: str | Path, line: str) -> None:
    """Append `line` (ending in a newline) to the file `path` whole or not at all: a write the disk
    cuts short (ENOSPC) is cut back off, so the file always ends with a complete line. Raises the
    OSError, naming `path`."""
    data = memoryview(line.encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_UMASK)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            if isinstance(err, OSError):
                err.filename = str(path)
            raise
    finally:
        os.close(fd)


def write_file(path: str | Path, write: Callable[[], None]) -> None:
    """Run `write()`, which writes `path` through a library (safetensors, torch.save). Their own
    error types for a failed write (SafetensorError, RuntimeError) become the OSError they stand
    for, naming `path`, when the reason is the system's (a full disk); other errors pass as they are."""
    try:
        write()
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
    except Exception as err:
        code = _errno_of(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _errno_of(err: Exception) -> int | None:
    """The errno in a library's write error: Rust's `Os { code: 28, ... }` (safetensors) or a cause."""
    cause = err.__cause__ or err.__context__
    if isinstance(cause, OSError) and cause.errno:
        return cause.errno
    text = str(err)
    if match := re.search(r"\bOs \{ code: (\d+)", text):
        return int(match.group(1))
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        if os.strerror(code) in text:
            return code
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot, so the caller renames in two steps."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))



@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, replaceable: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary directory beside `out_dir`; when
    the block ends without error its files are fsynced and it replaces `out_dir`. On Linux the two
    are swapped in one step, so `out_dir` names a complete directory at every instant; elsewhere an
    existing `out_dir` is moved aside first and deleted last (a crash leaves one complete copy).
    Writers of one `out_dir` take turns, and copies a killed writer left are removed first.
    An existing `out_dir` is only replaced when it holds nothing but files named in
    `replaceable`, so a mistyped path never deletes a project directory."""
    out_dir = Path(out_dir)
    refuse_dangling_link(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GptforgeError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in replaceable or not p.is_file())
        if others:
            raise GptforgeError(f"{out_dir} exists and holds other things than a checkpoint ({short_list(others)}); "
                             f"refusing to replace it: choose a new or empty directory")
    ensure_dir(out_dir.parent)
    with _lock_beside(out_dir):
        _remove_stale(out_dir)
        tmp = Path(_temp_in(out_dir.parent, lambda: tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp",
                                                                    dir=out_dir.parent)))
        try:
            os.chmod(tmp, 0o777 & ~_UMASK)
            yield tmp
            for file in tmp.iterdir():
                os.chmod(file, 0o666 & ~_UMASK)  # safetensors, like mkstemp, writes 0600 files
                _fsync_file(file)
            _fsync_dir(tmp)
            if out_dir.exists() and _exchange(tmp, out_dir):
                _fsync_dir(out_dir.parent)  # tmp now holds the old directory, removed below
            else:
                old = None
                if out_dir.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
                    os.replace(out_dir, old / out_dir.name)
                os.replace(tmp, out_dir)
                _fsync_dir(out_dir.parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as err:
            _name_target(err, tmp, out_dir)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file(path, lambda: save_file(tensors, str(path), metadata=metadata))


# ----------------------------------------------------------------------------------------------


def short_list(names: list[str], limit: int = 6) -> str:
    """`names` joined for an error message, the first `limit` of them and a count."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
