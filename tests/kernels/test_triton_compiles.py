"""The Triton kernels compile for Hopper (sm_90) even on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so type and layout errors of
the compiled path would only show on a GPU. Triton can compile ahead of time for a named target
(TTIR -> PTX -> cubin with its bundled ptxas); this does so, in a subprocess because the test
session runs with TRITON_INTERPRET=1.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from alignfast.kernels import logprobs as K

    def ints(*names):
        return {n: "i32" for n in names}

    common = {**ints("N", "V", "H", "stride_hn", "stride_hk", "stride_wv", "stride_wk"),
              "softcap": "fp32", "inv_temp": "fp32", "N_BUCKET": "i32", "filter_eps": "fp32"}

    def compile_(kernel, dt, acc, ptrs, consts, cfg):
        sig = {**{p: f"*{acc}" for p in ptrs}, "hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}",
               "bias_ptr": f"*{dt}", "targets_ptr": "*i64", **common}
        consts = dict(consts, UPCAST=False, DOT_PRECISION="ieee", INDEX64=on, BLOCK_N=cfg.block_n,
                      BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)
        order = [a for a in kernel.arg_names if a in sig or a in consts]
        full = {a: sig.get(a, "constexpr") for a in order}
        k = triton.compile(ASTSource(kernel, full, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0

    import torch
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dt, on in (("bf16", True), ("fp32", False)):
        fwd = K.default_config(dtypes[dt], 1, 1, 1, "fwd")
        bwd = K.default_config(dtypes[dt], 1, 1, 1, "bwd")
        # on: every optional feature, and int64 offsets (`INDEX64`, for operands past 2^31 elements).
        if on:  # the forward's flag-off branches are trivial; the backward's are not
            compile_(K._logprobs_fwd_kernel, dt, "fp32",
                     ("logprob_ptr", "lse_ptr", "entropy_ptr", "zmean_ptr"),
                     dict(HAS_BIAS=on, SOFTCAP=on, WITH_ENTROPY=on, WITH_ZMEAN=on), fwd)
        compile_(K._logprobs_bwd_kernel, dt, "fp32",
                 ("lse_ptr", "entropy_ptr", "g_lp_ptr", "g_lse_ptr", "g_ent_ptr", "g_zm_ptr",
                  "grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"),
                 dict(HAS_BIAS=on, SOFTCAP=on, G_ENTROPY=on, G_ZMEAN=on, NEED_DH=on, NEED_DW=True,
                      NEED_DB=on, FILTER=on, GROUP_N=bwd.group_n), bwd)
    print("compiled")
''')


def test_kernels_compile_for_sm90(tmp_path):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isdir(ptxas):
        pytest.skip("this Triton has no bundled NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
