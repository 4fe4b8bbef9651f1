"""Builds csrc/cuda/*.cu against the CPU emulation of CUDA in cuda_emulator/ and loads the launchers
through ctypes (cuda_emulator/bridge.cpp), so the CUDA kernels' own code runs in the CPU test suite.

The only source change is the launch syntax, which is not C++: `kernel<<<grid, block, smem, stream>>>(`
becomes `::emu::Launch(grid, block, smem, stream).run(kernel, `.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
FLAGS = ["-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-pthread"]
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def emulated_source(text: str) -> str:
    """A .cu file's text with every kernel launch rewritten as a call into the emulator."""
    out, launches = LAUNCH.subn(lambda m: f"::emu::Launch({m.group(2)}).run({m.group(1)}, ", text)
    if "<<<" in out:
        raise ValueError("a kernel launch the emulator's rewrite did not recognise")
    return out


def _sources() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu")) + [EMULATOR / "bridge.cpp"]


def build(out_dir: Path | None = None) -> ctypes.CDLL:
    """Compiles (once per source version) and loads the emulated launchers."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    inputs = _sources() + sorted(EMULATOR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh")) + sorted(
        (ROOT / "csrc").glob("*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out_dir = Path(out_dir or tempfile.gettempdir()) / f"alignfast-cuda-emulated-{digest}"
    lib = out_dir / "libemulated.so"
    if not lib.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=out_dir.parent))
        objects = []
        for src in _sources():
            cpp = work / (src.stem + ".cpp")
            cpp.write_text(emulated_source(src.read_text()) if src.suffix == ".cu" else src.read_text())
            obj = work / (src.stem + ".o")
            subprocess.run([cxx, *FLAGS, f"-I{EMULATOR}", f"-I{CUDA_DIR}", "-c", str(cpp), "-o", str(obj)],
                           check=True, capture_output=True, text=True)
            objects.append(str(obj))
        subprocess.run([cxx, "-shared", "-pthread", *objects, "-o", str(work / "libemulated.so")],
                       check=True, capture_output=True, text=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        os.replace(work / "libemulated.so", lib)   # atomic: concurrent builders each finish whole
        shutil.rmtree(work, ignore_errors=True)
    return ctypes.CDLL(str(lib))
