"""Headless Chromium for the report's test: Debian's ``chromium`` package, installed with apt-get when
the machine lacks it (CI's fresh machines do), run with a fresh profile and nothing from the network."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--enable-logging=stderr", "--v=0"]


def ensure_chromium() -> str:
    """The chromium binary; installs Debian's package first where there is none."""
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get"):
        raise RuntimeError("no chromium and no apt-get to install it: install Debian's chromium package")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, text=True, timeout=900, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, timeout=900, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install chromium failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return shutil.which("chromium") or "/usr/bin/chromium"


@dataclass(frozen=True)
class Shot:
    png: Path
    dom: str
    console: list[str]  # what the page wrote to its console, and resources it failed to load


def screenshot(page: Path, work: Path, width: int = 1200, height: int = 3000) -> Shot:
    binary = ensure_chromium()
    png = work / "screenshot.png"
    base = [binary, *FLAGS, f"--window-size={width},{height}"]
    shot = subprocess.run([*base, f"--user-data-dir={work / 'profile-shot'}", f"--screenshot={png}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = subprocess.run([*base, f"--user-data-dir={work / 'profile-dom'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    if shot.returncode != 0 or dom.returncode != 0:
        raise RuntimeError(f"chromium failed:\n{shot.stderr[-2000:]}\n{dom.stderr[-2000:]}")
    console = [line for line in (shot.stderr + dom.stderr).splitlines()
               if "CONSOLE" in line or "Failed to load resource" in line or "Uncaught" in line]
    return Shot(png, dom.stdout, console)
