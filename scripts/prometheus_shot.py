#!/usr/bin/env python
"""Screenshot of the real Prometheus UI graphing a real splade-obs run's training loss.

1. Starts a real ``prometheus`` (Debian package ``prometheus``) on 127.0.0.1 at a free port, with a temporary
   config scraping 127.0.0.1:<target> every second and a temporary TSDB.
2. Runs a real ``splade-obs train`` (splade-tiny on CPU, ``--max-steps`` steps, MLflow off) with
   ``--prometheus-port <target> --prometheus-linger`` so the final values stay scrapable for a few seconds.
3. Asks Prometheus's HTTP API that it holds ``splade_train_loss`` samples, then opens its graph page for
   ``splade_train_loss`` in headless Chromium (Playwright driving the system's Chromium, as scripts/ui_check.py
   does) and saves a screenshot (``--out``, default ``outputs/prometheus-shot/prometheus-loss-full.png``).
4. With ``--docs-image PATH`` also writes a small copy for the README: about 760 px wide, 64 colours
   (``docs/images/prometheus-loss.png``); the script fails when that copy is 60 KB or more.

Usage: ``.venv/bin/python scripts/prometheus_shot.py [--steps 150] [--out DIR] [--docs-image PATH]``.
Exit status: 0 on success, 1 when a step fails, 2 when no prometheus binary or browser is available.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.ui_check import browser_missing_reason, find_chromium  # noqa: E402
from tests._otlp_receiver import free_port  # noqa: E402

QUERY = "splade_train_loss"
DOCS_MAX_BYTES = 60_000


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def start_prometheus(work: Path, target: int) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on 127.0.0.1 scraping the trainer's endpoint every second; (process, base URL)."""
    binary = shutil.which("prometheus")
    assert binary, "no prometheus binary"
    api = free_port()
    conf = work / "prometheus.yml"
    conf.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                    f"  - job_name: splade\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={conf}", f"--web.listen-address=127.0.0.1:{api}",
                             f"--storage.tsdb.path={work / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{api}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if "Ready" in get(f"{base}/-/ready", timeout=1):
                return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prometheus did not start: {(work / 'prometheus.log').read_text()[-2000:]}")
        time.sleep(0.2)


def train(work: Path, target: int, steps: int) -> None:
    """A real short training run serving its metrics on 127.0.0.1:<target>."""
    cli = Path(sys.executable).with_name("splade-obs")
    cmd = [str(cli) if cli.exists() else "splade-obs", "train", "--output-dir", str(work / "out"),
           "--max-steps", str(steps), "--log-every-steps", "1", "--progress", "none", "--no-mlflow",
           "--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32",
           "--run-name", "prometheus-demo", "--prometheus-port", str(target), "--prometheus-linger", "5"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with (work / "train.log").open("wb") as log:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    if rc != 0:
        raise RuntimeError(f"training failed ({rc}): {(work / 'train.log').read_text()[-2000:]}")


def loss_samples(base: str) -> int:
    q = urllib.parse.urlencode({"query": f"{QUERY}[15m]"})
    doc = json.loads(get(f"{base}/api/v1/query?{q}"))
    return sum(len(series["values"]) for series in doc["data"]["result"])


def screenshot(base: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    params = urllib.parse.urlencode({"g0.expr": QUERY, "g0.tab": "0", "g0.range_input": "1m"})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(f"{base}/graph?{params}", wait_until="networkidle")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the query's result: one series, with the run's name in its legend
                page.get_by_text("Total time series: 1").wait_for(timeout=20_000)
                page.get_by_text('splade_run_name="prometheus-demo"').first.wait_for(timeout=20_000)
            finally:
                page.wait_for_timeout(1500)
                page.screenshot(path=str(path))
        finally:
            browser.close()


def docs_copy(src: Path, dest: Path, width: int = 760) -> int:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=64).save(dest, optimize=True)
    size = dest.stat().st_size
    if size >= DOCS_MAX_BYTES:
        raise RuntimeError(f"{dest} is {size} bytes (limit {DOCS_MAX_BYTES})")
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "prometheus-shot")
    ap.add_argument("--docs-image", type=Path, default=None)
    args = ap.parse_args(argv)
    if shutil.which("prometheus") is None:
        print("no prometheus binary (apt-get install prometheus)", file=sys.stderr)
        return 2
    if (reason := browser_missing_reason()) is not None:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="prom-shot-") as tmp:
        work = Path(tmp)
        target = free_port()
        proc, base = start_prometheus(work, target)
        try:
            train(work, target, args.steps)
            n = loss_samples(base)
            if n < 3:
                raise RuntimeError(f"prometheus holds only {n} samples of {QUERY}")
            full = args.out / "prometheus-loss-full.png"
            screenshot(base, full)
            print(f"{n} samples of {QUERY} scraped; screenshot: {full}")
            if args.docs_image:
                print(f"docs copy: {args.docs_image} ({docs_copy(full, args.docs_image)} bytes)")
        except Exception as exc:  # noqa: BLE001 - reported as the exit status
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
