"""Builds `alignfast._C` from csrc/.

The native build is optional: without torch at build time, without a compiler, with
ALIGNFAST_SKIP_NATIVE=1, or when compilation fails, the install still succeeds (with a
warning) and alignfast runs on its Python backends. Build knobs (environment variables):

    ALIGNFAST_SKIP_NATIVE=1      skip alignfast._C entirely
    ALIGNFAST_SKIP_CUDA=1        build only the CPU kernels even with a CUDA torch and nvcc
    ALIGNFAST_CUDA_ARCHS="8.0;9.0"  CUDA architectures, torch's TORCH_CUDA_ARCH_LIST format
    ALIGNFAST_PORTABLE=1         no -march=native (for wheels built on one machine, run on another)
    MAX_JOBS=N                   parallel compile jobs (torch's own knob)

Install with `pip install --no-build-isolation -e .` so the build sees your torch.
"""
import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup


def _truthy(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def native_extensions():
    """The alignfast._C extension, or [] when it cannot or should not be built."""
    if _truthy("ALIGNFAST_SKIP_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("alignfast: torch is not importable at build time; skipping alignfast._C "
                      "(install with --no-build-isolation to build it)")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                 and not _truthy("ALIGNFAST_SKIP_CUDA") and bool(cuda_sources))
    cxx_flags = ["-O3", "-fopenmp"] + ([] if _truthy("ALIGNFAST_PORTABLE") else ["-march=native"])
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("ALIGNFAST_CUDA_ARCHS", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "alignfast._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DALIGNFAST_WITH_CUDA"],
                                # no --use_fast_math: it turns tanhf (the softcap) into tanh.approx
                                # (~1e-5 relative) and logf into __logf; the kernels call __expf where
                                # the fast exponential is meant. csrc/check_cuda.sh compiles the same way.
                                "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("alignfast._C", cpp_sources,
                                         extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _optional_build_ext(cpp_extension.BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """A failed native build leaves a working pure-Python install, with a warning."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure must not fail the install
                warnings.warn(f"alignfast: building alignfast._C failed ({err}); "
                              "continuing with the Python backends only")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"alignfast: building {ext.name} failed ({err}); "
                              "continuing with the Python backends only")

    return OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["alignfast", "alignfast.*"]),
    package_data={"alignfast": ["data/assets/*", "data/*.yaml", "configs/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
