"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) even on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so what only the compiled path
rejects (a non-constexpr global read in a kernel, a type or layout error, an unsupported dot) would
only show on a GPU. Triton compiles ahead of time for a named target (TTIR -> PTX -> cubin with its
bundled ptxas); this does so in a subprocess, since the test session runs with TRITON_INTERPRET=1.
Signatures are the ones a launch gives: pointers 16-byte aligned and unit inner strides specialised.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from alignfast.kernels import gae as G, kl as KL, logprobs as K, pg_token_loss as PG

    ARCH = int(sys.argv[1])
    TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    UNIT = ("stride_hk", "stride_wk", "stride_rk", "stride_rwk")  # contiguous rows: a launch specialises 1

    def compile_(kernel, sig, consts, num_warps=4, num_stages=3):
        consts = {a: v for a, v in {**consts, **{a: 1 for a in UNIT}}.items() if a in kernel.arg_names}
        sig = {a: t for a, t in sig.items() if a in kernel.arg_names and a not in consts}
        missing = [a for a in kernel.arg_names if a not in sig and a not in consts]
        assert not missing, (kernel.__name__, missing)
        order = [a for a in kernel.arg_names if a in sig or a in consts]
        attrs = {(order.index(a),): [["tt.divisibility", 16]] for a in sig if sig[a].startswith("*")}
        k = triton.compile(ASTSource(kernel, {a: sig.get(a, "constexpr") for a in order}, consts, attrs),
                           target=GPUTarget("cuda", ARCH, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
        assert len(k.asm["cubin"]) > 0

    def ints(*names):
        return {n: "i32" for n in names}

    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t, acc = TY[dt], "fp64" if dt == torch.float64 else "fp32"
        if ARCH == 80 and dt in (torch.float16, torch.float64):
            continue  # the sm_90 compile covers these dtypes' code paths
        # linear_logprobs: every optional feature on; int64 offsets for the 16-bit types
        inputs = {"hidden_ptr": f"*{t}", "weight_ptr": f"*{t}", "bias_ptr": f"*{t}", "targets_ptr": "*i64"}
        common = {**ints("N", "V", "H", "stride_hn", "stride_hk", "stride_wv", "stride_wk", "N_BUCKET"),
                  "scalars_ptr": f"*{acc}"}
        flags = dict(UPCAST=False, DOT_PRECISION="ieee", INDEX64=t in ("bf16", "fp16"), HAS_BIAS=True, SOFTCAP=True)
        for kernel, outs, extra, which in (
                (K._logprobs_fwd_kernel, ("logprob_ptr", "lse_ptr", "entropy_ptr", "zmean_ptr"),
                 dict(WITH_ENTROPY=True, WITH_ZMEAN=True), "fwd"),
                (K._logprobs_bwd_kernel, ("lse_ptr", "entropy_ptr", "g_lp_ptr", "g_lse_ptr", "g_ent_ptr", "g_zm_ptr",
                                          "grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"),
                 dict(G_ENTROPY=True, G_ZMEAN=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, FILTER=True), "bwd")):
            cfg = K.default_config(dt, 1, 1, 1, which)
            blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n)
            compile_(kernel, {**inputs, **{p: f"*{acc}" for p in outs}, **common}, {**flags, **extra, **blocks},
                     cfg.num_warps, cfg.num_stages)
        # linear_kl, both directions
        inputs = {p: f"*{t}" for p in ("hidden_ptr", "weight_ptr", "bias_ptr", "ref_hidden_ptr", "ref_weight_ptr",
                                        "ref_bias_ptr")}
        common = {**ints("N", "V", "H", "H_REF", "stride_hn", "stride_hk", "stride_wv", "stride_wk", "stride_rn",
                         "stride_rk", "stride_rv", "stride_rwk", "N_BUCKET"), "scalars_ptr": f"*{acc}"}
        outs = {p: f"*{acc}" for p in ("kl_ptr", "lse_ptr", "ref_lse_ptr", "g_ptr", "grad_hidden_ptr",
                                        "grad_weight_ptr", "grad_bias_ptr")}
        for reverse in (False, True):
            flags = dict(UPCAST=False, DOT_PRECISION="ieee", INDEX64=False, HAS_BIAS=True, HAS_REF_BIAS=True,
                         REVERSE=reverse, NEED_DH=True, NEED_DW=True, NEED_DB=True)
            for kernel, which in ((KL._kl_fwd_kernel, "fwd"), (KL._kl_bwd_kernel, "bwd")):
                cfg = K.default_config(dt, 1, 1, 1, which)
                blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n)
                compile_(kernel, {**inputs, **outs, **common}, {**flags, **blocks}, cfg.num_warps, cfg.num_stages)

    # the elementwise kernels: GAE's reverse scan and the PPO/GRPO token pass
    for acc, tacc in (("fp32", tl.float32), ("fp64", tl.float64)):
        compile_(G._gae_reverse_scan_kernel, {"rewards_ptr": f"*{acc}", "values_ptr": "*bf16" if acc == "fp32"
                                              else "*fp64", "mask_ptr": "*i8", "coef_ptr": f"*{acc}",
                                              "adv_ptr": f"*{acc}", "ret_ptr": f"*{acc}", "T": "i32"}, dict(ACC=tacc))
        sig = {**{p: f"*{acc}" for p in ("logp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "coef_ptr", "loss_ptr",
                                         "dloss_ptr", "ratio_ptr", "akl_ptr", "kl_ptr")},
               "valid_ptr": "*i8", "flags_ptr": "*u8", "N": "i32", "T": "i32"}
        for kl_est in (1, 2, 3):
            compile_(PG._pg_token_loss_kernel, sig, dict(HAS_OLD=True, HAS_REF=True, ADV_PER_ROW=kl_est == 2,
                                                         DUAL_CLIP=True, CLAMP=True, KL_EST=kl_est, ACC=tacc,
                                                         BLOCK=PG.BLOCK))
    print("compiled")
''')


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles(arch, tmp_path):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isdir(ptxas):
        pytest.skip("this Triton has no bundled NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
