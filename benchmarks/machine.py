"""The machine and software a run was measured on: carried by every result row."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from alignfast.ops.cpu_layout import token_chunks_vocab_major

ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("-dirty" if commit and git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def describe(device_type: str) -> dict:
    gpu = device_type == "cuda" and torch.cuda.is_available()
    return {
        "device_type": device_type,
        "device": torch.cuda.get_device_name(0) if gpu else _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": _version("triton"),
        "alignfast": _version("alignfast"),
        "liger_kernel": _version("liger-kernel"),
        "trl": _version("trl"),
        "git_commit": _git_commit(),
        "chunk_bytes_env": os.environ.get("ALIGNFAST_CHUNK_BYTES", ""),
        "cpp_token_chunks": "vocab-major" if token_chunks_vocab_major() else "row-major",
    }
