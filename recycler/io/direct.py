"""File I/O that does not pay for the page cache when the page cache buys nothing.

Outputs are fsynced before they are published, so their bytes go to the disk anyway; copying them into
the page cache first only costs CPU. On this project's build machines (Firecracker VMs) that cost is
large: every newly cached page is a fresh guest page, and buffered writes ran at 0.24 GB/s with 2.5 s of
kernel time per GB, where O_DIRECT wrote 2.1 GB/s with 0.04 s (bench/RESULTS.md). So:

* `DirectWriter` writes a file sequentially with O_DIRECT through aligned staging buffers, the disk
  I/O on its own thread (the caller hashes the next bytes meanwhile). Where O_DIRECT is refused
  (tmpfs, some network file systems) it falls back to ordinary writes.
* `pread_into` reads through the page cache with sequential read-ahead. Reading what is not cached
  with O_DIRECT instead (`RECYCLER_READ_DIRECT=1`: cached bytes via `RWF_NOWAIT`, the rest around the
  cache) was this module's default until it was measured on a checkpoint larger than memory: a
  13.5 GB recycle from a cold cache took 86.9 s with O_DIRECT reads and 40.9 s buffered, the O_DIRECT
  copy floor 59.2 s (bench/RESULTS.md, 2026-12-06): the kernel's read-ahead keeps the disk busy while
  2 MB synchronous O_DIRECT reads at queue depth 1–2 leave it idle between requests, and that matters
  more than the page-cache cost that made writes go around it.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT wants offsets, sizes and buffer addresses aligned to the logical block size
STAGE = 1 << 20  # staging holds headers and unaligned tails; aligned chunks are written in place
O_DIRECT = getattr(os, "O_DIRECT", 0)
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` whose address is a multiple of ALIGN."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


class DirectWriter:
    """A sequentially written file: `write()` / `write_owned()` bytes, then `close()` or `abort()`.

    `write` copies into an aligned staging buffer; `write_owned` hands an aligned caller buffer to the
    I/O thread as it is (no copy) when the file position is on a block boundary (after a header padded
    to one, the header is sent first), and calls `release` once written.
    """

    def __init__(self, path: Path, *, stage: int = STAGE, depth: int = 2):
        self.path, self.size, self._error, self._closed = Path(path), 0, None, False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd, self.direct = os.open(self.path, flags | O_DIRECT, 0o644), bool(O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fd, self.direct = os.open(self.path, flags, 0o644), False
        self._stage, self._spare = stage, depth  # staging buffers are made on first use
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._io: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="direct-io", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            if self._buf is None:
                self._buf = self._staging()
            n = min(len(view), len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = np.frombuffer(view[:n], np.uint8)
            self._fill += n
            self.size += n
            view = view[n:]
            if self._fill == len(self._buf):
                self._submit()

    def write_owned(self, buf: np.ndarray, nbytes: int, release: Callable[[], None]) -> None:
        """Write `buf[:nbytes]`; `release()` is called when `buf` may be reused."""
        aligned = not self.size % ALIGN and not nbytes % ALIGN and not buf.ctypes.data % ALIGN
        if not aligned:
            self.write(buf[:nbytes])
            release()
            return
        if self._fill:  # staged bytes (a header) ending on a block boundary go first, as they are
            self._submit()
        self._raise()
        self._io.put((buf, nbytes, release))
        self.size += nbytes

    def close(self, *, fsync: bool = True) -> None:
        """Write the tail (padded to ALIGN, then truncated), wait for the disk, fsync, close."""
        if self._closed:
            return
        self._closed = True
        try:
            tail = self._fill
            if tail:
                if self.direct:
                    padded = -(-tail // ALIGN) * ALIGN
                    self._buf[tail:padded] = 0
                    self._fill = padded
                self._submit()
            self._io.put(None)
            self._thread.join()
            self._raise()
            if self.direct:
                os.ftruncate(self._fd, self.size)
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._io.put(None)
        self._thread.join(timeout=30)
        os.close(self._fd)

    def _staging(self) -> np.ndarray:
        if self._spare:
            self._spare -= 1
            return aligned_buffer(self._stage)
        return self._free.get()

    def _submit(self) -> None:
        self._raise()
        buf = self._buf
        self._io.put((buf, self._fill, lambda: self._free.put(buf)))
        self._buf, self._fill = None, 0

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._io.get()) is not None:
            buf, n, release = item
            try:
                if self._error is None:
                    self._write_all(buf[:n])
            except BaseException as e:
                self._error = OSError(e.errno, e.strerror, str(self.path)) if isinstance(e, OSError) else e
            release()

    def _write_all(self, data: np.ndarray) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self._fd, data[done:])
            except OSError as e:  # a file system that takes O_DIRECT at open but not these sizes
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                import fcntl

                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
                self.direct = False


class DirectReads:
    """Per-file O_DIRECT descriptors and per-thread bounce buffers for `pread_into`."""

    def __init__(self) -> None:
        self._fds: dict[Path, int | None] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def fd(self, path: Path) -> int | None:
        if path not in self._fds:
            with self._lock:
                if path not in self._fds:
                    try:
                        self._fds[path] = os.open(path, os.O_RDONLY | O_DIRECT) if O_DIRECT else None
                    except OSError:
                        self._fds[path] = None
        return self._fds[path]

    def bounce(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = aligned_buffer(nbytes)
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def pread_into(fd: int, path: Path, offset: int, into: memoryview, direct: DirectReads) -> int:
    """Fill `into` from `offset` through the page cache; with `direct_reads()`, page-cached bytes as
    they are and the rest with O_DIRECT. Returns the bytes read (short only at end of file).
    """
    got = 0
    if not direct_reads():
        while got < len(into) and (n := os.preadv(fd, [into[got:]], offset + got)):
            got += n
        return got
    if RWF_NOWAIT:
        try:
            got = os.preadv(fd, [into], offset, RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            got = 0
        except OSError as e:  # file systems without RWF_NOWAIT
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    dfd = direct.fd(path) if got < len(into) else None
    if dfd is not None:
        return got + _read_direct(dfd, offset + got, into[got:], direct)
    while got < len(into):
        n = os.preadv(fd, [into[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _read_direct(fd: int, offset: int, into: memoryview, direct: DirectReads) -> int:
    if not (offset % ALIGN or len(into) % ALIGN or np.frombuffer(into, np.uint8).ctypes.data % ALIGN):
        got = 0  # aligned on every count (our own shards): straight into the caller's buffer
        while got < len(into) and (n := os.preadv(fd, [into[got:]], offset + got)):
            got += n
        return got
    start = offset - offset % ALIGN
    end = -(-(offset + len(into)) // ALIGN) * ALIGN
    buf = direct.bounce(end - start)
    got = 0
    while start + got < offset + len(into):
        n = os.preadv(fd, [memoryview(buf[got : end - start])], start + got)
        if n == 0:
            break
        got += n
    have = max(0, min(len(into), start + got - offset))
    into[:have] = memoryview(buf[offset - start : offset - start + have])
    return have


def direct_reads() -> bool:
    """Read what is not cached with O_DIRECT (`RECYCLER_READ_DIRECT=1`) instead of through the cache."""
    return os.environ.get("RECYCLER_READ_DIRECT", "") == "1"


def open_for_reads(path: Path) -> int:
    """A buffered descriptor for `pread_into`: sequential read-ahead (the engine reads each file front
    to back), or none with O_DIRECT reads, which would pull into the page cache the very bytes that
    `pread_into` reads around it."""
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        advice = os.POSIX_FADV_RANDOM if direct_reads() and RWF_NOWAIT else os.POSIX_FADV_SEQUENTIAL
        os.posix_fadvise(fd, 0, 0, advice)
    return fd


def read_file_blocks(path: Path, block: int = 4 << 20) -> Iterator[memoryview]:
    """A file's bytes in blocks, without caching what is not cached already (for hashing)."""
    direct = DirectReads()
    fd = open_for_reads(path)
    buf = aligned_buffer(block)
    try:
        offset = 0
        while n := pread_into(fd, Path(path), offset, memoryview(buf), direct):
            offset += n
            yield memoryview(buf)[:n]
    finally:
        os.close(fd)
        direct.close()
