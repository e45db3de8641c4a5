"""Helpers shared by the benchmark scripts: JSON lines to stdout, logs to stderr, run metadata."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch


def git_sha() -> str:
    """The checkout's commit; LMFORGE_GIT_SHA names it where the tree travels without .git (a device machine)."""
    if os.environ.get("LMFORGE_GIT_SHA"):
        return os.environ["LMFORGE_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)
