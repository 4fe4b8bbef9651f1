"""The package installs as `alignfast` with `alignfast.kernels`, and no top-level `kernels` of its own
(PyPI has a `kernels` package that transformers imports: ours must not shadow it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ("import importlib.util, os, alignfast, alignfast.kernels; "
         "spec = importlib.util.find_spec('kernels'); "
         "assert spec is None or 'site-packages' in spec.origin, f'a top-level kernels of ours: {spec.origin}'; "
         "assert os.path.dirname(alignfast.kernels.__file__).startswith(os.path.dirname(alignfast.__file__)); "
         "print(alignfast.kernels.__file__, alignfast.backends())")


def run_outside_repo(tmp_path, code, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_editable_install_imports_from_outside_the_repo(tmp_path):
    res = run_outside_repo(tmp_path, CHECK)
    assert res.returncode == 0, res.stderr
    assert "kernels" in res.stdout


@pytest.mark.slow
def test_regular_install_without_native_build(tmp_path):
    """`pip install .` with the native build skipped: a working pure-Python install."""
    target = tmp_path / "site"
    env = dict(os.environ, ALIGNFAST_SKIP_NATIVE="1")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (target / "alignfast" / "kernels" / "__init__.py").exists()
    assert not (target / "kernels").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    # This venv also holds the editable install, whose import hook would find the repo's built
    # alignfast._C; drop that hook so only the fresh install is seen.
    no_editable = ("import sys; sys.meta_path = [f for f in sys.meta_path "
                   "if '__editable__' not in getattr(f, '__module__', '')]; ")
    res = run_outside_repo(tmp_path, no_editable + CHECK + "; import alignfast, torch; "
                           "assert alignfast.__file__.startswith(%r); "
                           "print(alignfast.linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), "
                           "torch.tensor([1, 2, 3])).logprobs)" % str(target), env=env)
    assert res.returncode == 0, res.stderr
    assert "'chunked'" in res.stdout and "'cpp'" not in res.stdout
