"""Screenshots of what a person meets in the MLflow and Prefect UIs after `recycler demo`.

    python docs/ui/screens.py [--demo out/demo-ui] [--out docs/ui]

Runs the demo (`--fast`) into DEMO unless it is there, starts `mlflow ui` on the demo's SQLite store
and a Prefect server on the demo's Prefect database (both on loopback, free ports), drives a headless
Chromium (Debian's `chromium`) over the DevTools protocol, and saves PNGs: the registry list, a Δ's
version page, a fine-tune's page, the runs table with a cycle's nested step runs, the cycle run's page, and
the backport's flow run and its Markdown artifact in Prefect. Not part of CI; `make ui-screens`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from websockets.sync.client import connect

ML = "workflowType=machine_learning"
WIDTH, HEIGHT = 1440, 960


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def server(cmd: list[str], health: str, env: dict[str, str], log: Path) -> Iterator[None]:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(health)
        yield
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        proc.kill()


class Browser:
    """A headless Chromium tab driven over the DevTools protocol: navigate, wait for text, click, shoot."""

    def __init__(self, profile: Path) -> None:
        port = free_port()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                 f"--window-size={WIDTH},{HEIGHT}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(
            ["chromium", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_http(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self.next_id = 0
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, *, wait_for: str, timeout: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(wait_for, timeout)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
                time.sleep(1.5)  # let images and late widgets settle
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} never appeared")

    def dismiss(self) -> None:
        """Close what a first visit pops up (MLflow's what's-new dialog, its assistant panel)."""
        self.click_all("[role=dialog] button[aria-label=Close], button[aria-label=Close]")
        time.sleep(1)

    def expand_row(self, text: str) -> None:
        """Unfold the nested runs of the runs-table row that shows `text`."""
        self.js(
            "[...document.querySelectorAll('[role=row]')].filter(r => r.innerText.includes("
            + json.dumps(text)
            + ")).forEach(r => r.querySelector(\"button[data-component-id*='runnamecellrenderer']\")?.click())"
        )
        time.sleep(2)

    def click_text(self, text: str) -> None:
        """Click the innermost button, tab or link whose text is `text`."""
        self.js(
            "[...document.querySelectorAll('button, [role=tab], a, li, span')].filter(e => e.innerText.trim() === "
            + json.dumps(text)
            + ").slice(-1).forEach(e => (e.closest('button, [role=tab], a, li') || e).click())"
        )
        time.sleep(2)

    def click_all(self, selector: str) -> int:
        return int(
            self.js(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.click()).length") or 0
        )

    def shoot(self, path: Path, height: int = HEIGHT) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        time.sleep(0.5)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"saved {path}")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()


def prefect_post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{api}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def prefect_flow_run(api: str, name_prefix: str) -> dict:
    runs = prefect_post(api, "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    return next(r for r in runs if r["name"].startswith(name_prefix))


def shoot_mlflow(b: Browser, ui: str, result: dict, out: Path) -> None:
    cycle, back = result["cycles"][-1], result["backport"]
    page = lambda path: f"{ui}/#/{path}?{ML}"  # noqa: E731
    b.open(page("models"), wait_for="toy-arith-diff")
    b.dismiss()
    b.shoot(out / "registry.png", 560)
    b.open(page(f"models/{back['diff'].replace('/', '/versions/')}"), wait_for="Used by")
    b.dismiss()
    b.shoot(out / "diff-version.png", 1000)
    b.open(page(f"models/{cycle['registered']['ft'].replace('/', '/versions/')}"), wait_for="Lineage")
    b.shoot(out / "ft-version.png", 900)
    b.open(page("experiments/1/runs"), wait_for="cycle toy")
    b.expand_row(f"@{cycle['version']}")
    b.shoot(out / "runs-nested.png", 760)
    b.open(page(f"experiments/1/runs/{cycle['run_id']}"), wait_for="Gate")
    b.click_text("Show more")
    b.shoot(out / "cycle-run.png", 1500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("out/demo-ui"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    demo, out = args.demo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (demo / "demo.json").is_file():
        demo_cmd = [sys.executable, "-m", "recycler", "demo", "--fast", "-o", str(demo), "--overwrite"]
        subprocess.run(demo_cmd, check=True)
    result = json.loads((demo / "demo.json").read_text())
    logs = Path(tempfile.mkdtemp(prefix="ui-screens-"))
    mlflow_port, prefect_port = free_port(), free_port()
    ui, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    store = f"sqlite:///{demo / '.recycler' / 'mlflow.db'}"
    mlflow = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
              "--port", str(mlflow_port), "--workers", "1"]  # fmt: skip
    prefect = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(prefect_port),
    ]
    # the demo's own Prefect database; the UI must be told where its API is (it assumes port 4200)
    prefect_env = {"PREFECT_HOME": str(demo / "prefect"), "PREFECT_UI_API_URL": api, "PREFECT_API_URL": api,
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    with (
        server(mlflow, f"{ui}/health", {}, logs / "mlflow.log"),
        server(prefect, f"{api}/health", prefect_env, logs / "prefect.log"),
    ):
        b = Browser(logs / "chromium")
        try:
            shoot_mlflow(b, ui, result, out)
            run = prefect_flow_run(api, "backport")
            b.open(f"http://127.0.0.1:{prefect_port}/runs/flow-run/{run['id']}", wait_for="backport")
            b.shoot(out / "prefect-backport.png", 1000)
            artifact = prefect_post(
                api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
            )[0]
            b.open(
                f"http://127.0.0.1:{prefect_port}/artifacts/artifact/{artifact['id']}", wait_for="no training"
            )
            b.shoot(out / "prefect-artifact.png", 700)
        finally:
            b.close()
    shutil.rmtree(logs / "chromium", ignore_errors=True)
    print(f"server logs in {logs}")


if __name__ == "__main__":
    main()
