"""Regenerate docs/tensorboard_expert_load.png: train the tiny MoE (configs/tiny.yaml) for a few
steps, serve its TensorBoard logs, and take a screenshot of the time-series page in headless
Chromium (Debian: `apt-get install chromium`).

    python tools/tensorboard_screenshot.py --out docs/tensorboard_expert_load.png --force

Chromium renders TensorBoard's cards, tables and image cards headless; the expert-load picture is
an image card, so what the screenshot shows is what a user sees.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(work: Path, steps: int) -> Path:
    """configs/tiny.yaml for `steps` steps, a picture every steps/3; returns the TensorBoard dir."""
    run = work / "tiny"
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"),
           str(REPO / "configs" / "tiny.yaml"), f"run_dir={run}", f"training.max_steps={steps}",
           f"logging.interval={max(steps // 3, 1)}", "training.eval_interval=0",
           "checkpoint.interval=0", f"data.cache_dir={work / 'data_cache'}"]
    subprocess.run(cmd, cwd=work, check=True)
    return run / "tb"


def screenshot(logdir: Path, out: Path, chromium: str) -> None:
    """Serve `logdir` with TensorBoard on a free port and save the time-series page to `out`."""
    port = _free_port()
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                               "--port", str(port)], **quiet)
    try:
        url = f"http://localhost:{port}/?darkMode=false#timeseries"
        _wait_for(url, timeout=60)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--force-device-scale-factor=1.5",
                        "--window-size=1100,900", "--virtual-time-budget=20000",
                        f"--screenshot={out}", url], check=True, timeout=180, **quiet)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: TensorBoard did not answer at {url} within "
                                 f"{timeout:.0f} s") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "tensorboard_expert_load.png"),
                        help="PNG to write")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the tiny MoE run")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists: pass --force to overwrite it")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium on PATH: install it "
                         "(Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="tb_screenshot_") as work:
        screenshot(train(Path(work), args.steps), out, chromium)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
