"""The O_DIRECT writer: the bytes are the bytes given, and aligned chunks after a block-padded header
reach the disk without a copy (a copy of every output byte once cost 5–7% of a recycle's CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from recycler.io.direct import ALIGN, DirectWriter, aligned_buffer


def chunks(n: int, size: int, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = aligned_buffer(size)
        b[:] = g.integers(0, 256, size, dtype=np.uint8)
        out.append(b)
    return out


@pytest.mark.parametrize("header", [2 * ALIGN, 100, 0])
def test_owned_chunks_after_a_header_are_written_as_given(tmp_path, monkeypatch, header):
    copies = []
    original = DirectWriter.write

    def counting(self, data):
        copies.append(len(memoryview(data).cast("B")))
        return original(self, data)

    monkeypatch.setattr(DirectWriter, "write", counting)
    head = np.random.default_rng(0).integers(0, 256, header, dtype=np.uint8).tobytes()
    data = chunks(4, 3 * ALIGN, 1)
    w = DirectWriter(tmp_path / "f")
    if header:
        w.write(head)
    released = []
    for i, c in enumerate(data):
        w.write_owned(c, len(c) - (ALIGN if i == 3 else 0), lambda i=i: released.append(i))
    w.close()
    want = head + b"".join(c.tobytes() for c in data[:3]) + data[3][:-ALIGN].tobytes()
    assert (tmp_path / "f").read_bytes() == want
    assert sorted(released) == [0, 1, 2, 3]
    copied = sum(copies) - header
    if header % ALIGN:  # off a block boundary: every chunk goes through the staging copy
        assert copied == len(want) - header
    else:  # the header (if any) is sent first, then each chunk as it is
        assert copied == 0


@pytest.mark.parametrize("mode", ["", "1"])
def test_reads_return_the_file_s_bytes_through_the_cache_or_around_it(tmp_path, monkeypatch, mode):
    """Buffered with read-ahead by default; RECYCLER_READ_DIRECT=1 reads what is not cached with
    O_DIRECT (aligned or not, via a bounce buffer). Same bytes either way, short only at the end."""
    import os
    from pathlib import Path

    from recycler.io.direct import DirectReads, direct_reads, open_for_reads, pread_into

    monkeypatch.setenv("RECYCLER_READ_DIRECT", mode)
    assert direct_reads() == (mode == "1")
    data = np.random.default_rng(3).integers(0, 256, 5 * ALIGN + 123, dtype=np.uint8).tobytes()
    w = DirectWriter(tmp_path / "f")  # written around the page cache, so nothing of it is cached
    w.write(data)
    w.close()
    path, reads = Path(tmp_path / "f"), DirectReads()
    fd = open_for_reads(path)
    try:
        for offset, size in ((0, 2 * ALIGN), (ALIGN, ALIGN), (77, 3000), (4 * ALIGN, 2 * ALIGN)):
            into = aligned_buffer(size)
            got = pread_into(fd, path, offset, memoryview(into), reads)
            want = data[offset : offset + size]
            assert got == len(want) and into[:got].tobytes() == want
    finally:
        os.close(fd)
        reads.close()
