"""Throughput of recycler.store: publish and fetch of a ~256 MB folder, local store vs S3 (moto).

    .venv/bin/python bench/bench_store.py [--size-mb 256] [--files 4] [--chunk-mb 64] [--concurrency 8]

moto runs as a separate `moto_server` process on 127.0.0.1 (in a thread it would share our GIL) and
keeps objects in memory, so S3 numbers measure our client path (hashing, s3transfer, HTTP), not a
disk or a network. Every publish and fetch includes the full sha256 verification the store always
does. Each row is printed beside its baseline, the same bytes moved with no hashing, no manifest and
no verification (`shutil.copytree` locally; plain boto3 `upload_file`/`download_file` with the same
transfer settings on S3), so the ratio is the price of "nothing lost, nothing half-written".
Prints MB/s (10^6 bytes per second).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from recycler.io.manifest import write_manifest
from recycler.store.local import LocalStore
from recycler.store.s3 import S3Store


def make_folder(root: Path, size_mb: int, files: int) -> Path:
    folder = root / "src"
    folder.mkdir()
    per = size_mb * 1024 * 1024 // files
    for i in range(files):
        (folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors").write_bytes(os.urandom(per))
    (folder / "config.json").write_text("{}")
    write_manifest(folder, {"kind": "diff"}, {})
    return folder


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(label: str, nbytes: int, fn, baseline: float | None = None) -> tuple[float, object]:
    """Run fn, print its wall time and throughput (and its ratio to `baseline` seconds), return both."""
    seconds, result = timed(fn)
    ratio = f"{seconds / baseline:6.2f}× baseline" if baseline else ""
    print(f"{label:<28} {seconds:7.2f} s  {nbytes / seconds / 1e6:8.1f} MB/s  {ratio}", flush=True)
    return seconds, result


def plain_s3(s3: S3Store, src: Path, dest: Path, nbytes: int) -> tuple[float, float]:
    """Baseline: upload then download every file with boto3 alone (no hashes, no manifest)."""
    files = sorted(src.iterdir())
    up, _ = measure(
        "s3 plain boto3 upload",
        nbytes,
        lambda: [
            s3.client.upload_file(str(f), "bench", f"plain/{f.name}", Config=s3.transfer) for f in files
        ],
    )
    dest.mkdir()
    down, _ = measure(
        "s3 plain boto3 download",
        nbytes,
        lambda: [
            s3.client.download_file("bench", f"plain/{f.name}", str(dest / f.name), Config=s3.transfer)
            for f in files
        ],
    )
    return up, down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    proc = None
    try:
        src = make_folder(root, args.size_mb, args.files)
        nbytes = sum(p.stat().st_size for p in src.iterdir())
        print(
            f"folder: {nbytes / 1e6:.0f} MB in {args.files} shards; chunk {args.chunk_mb} MiB, concurrency {args.concurrency}"
        )
        local = LocalStore(root / "store")
        copy, _ = timed(lambda: shutil.copytree(src, root / "plain-copy"))
        _, ref = measure("local publish", nbytes, lambda: local.publish(src, "diff"), copy)
        measure("local fetch", nbytes, lambda: local.fetch(ref, root / "local-out"), copy)
        measure("local verify", nbytes, lambda: local.verify(ref))
        proc, endpoint = start_moto()
        s3 = S3Store(
            "bench",
            "store",
            endpoint_url=endpoint,
            max_concurrency=args.concurrency,
            multipart_chunk_mb=args.chunk_mb,
        )
        s3.client.create_bucket(Bucket="bench")
        up, down = plain_s3(s3, src, root / "plain-out", nbytes)
        _, s3ref = measure("s3 (moto) publish", nbytes, lambda: s3.publish(src, "diff"), up)
        measure("s3 (moto) publish again", nbytes, lambda: s3.publish(src, "diff"), up)
        measure("s3 (moto) fetch", nbytes, lambda: s3.fetch(s3ref, root / "s3-out"), down)
        measure("s3 (moto) verify (stream)", nbytes, lambda: s3.verify(s3ref))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
