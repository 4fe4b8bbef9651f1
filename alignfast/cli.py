"""The `alignfast` command.

    alignfast train {sft,reward,dpo,kto,ppo,grpo,cai} [--config cfg.yaml] [--model M] [--dataset D] [--output-dir O] [key=value ...]
    alignfast demo [--output-dir DIR] [--quick] [--seed N]
                        SFT, reward model, PPO, DPO, KTO, GRPO and CAI on a tiny model and a synthetic
                        task, minutes on a CPU: held-out metrics before/after -> DIR/demo.md + plots
    alignfast compare [--tokens N] [--hidden H] [--vocab V]
                        fused `linear_logprobs` vs the naive reference: time and peak memory
    alignfast bench [--suite {smoke,cpu,cpu-models,gpu}] [--quick] [--dry-run] [--out DIR] [...]
                        the benchmark suites (`python -m benchmarks.run`, every option passed through;
                        `alignfast bench --help` lists them): each case in its own process, CSV/JSON,
                        summary.md and plots; from a source checkout (benchmarks/ is not installed)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _options_help(config_class) -> str:
    rows = config_class.options()
    width = max(len(name) for name, _, _ in rows)
    lines = ["options (key=value, or in the YAML config; default shown):"]
    lines += [f"  {name:<{width}}  = {default!r:<14}  {text}" for name, default, text in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from alignfast.trainers import STAGES

    parser = argparse.ArgumentParser(prog="alignfast", description="Fused-kernel LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one stage (sft, reward, dpo, kto, ppo, grpo, cai)")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage, (config_class, _) in STAGES.items():
        p = stages.add_parser(stage, help=f"{stage} training", epilog=_options_help(config_class),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML file of options (read with yaml.safe_load)")
        p.add_argument("--model", help="model directory (option `model`)")
        p.add_argument("--dataset", help="training data: a file, a datasets directory or a hub id (option `dataset`)")
        p.add_argument("--output-dir", dest="output_dir", help="output directory (option `output_dir`)")
        p.add_argument("--resume", dest="resume_from", nargs="?", const="latest",
                       help="resume from a checkpoint directory (default: the latest in output_dir)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="any option below")
    demo = sub.add_parser("demo", help="the whole pipeline on a tiny model and a synthetic task (minutes on a CPU)",
                          description="Builds a tiny Llama and a char-level tokenizer in code, then runs SFT, "
                                      "reward model -> PPO, DPO, KTO, GRPO and Constitutional AI on a word-reversal "
                                      "task with a verifiable reward, and writes the held-out metrics before and "
                                      "after each stage (demo.md) and the training curves (PNG) to --output-dir.")
    demo.add_argument("--output-dir", dest="output_dir", default="outputs/demo", help="default: outputs/demo")
    demo.add_argument("--quick", action="store_true", help="a shortened run (less data, fewer steps)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the task's data and of every stage")
    compare = sub.add_parser("compare", help="fused linear_logprobs vs the naive reference (time, peak memory)")
    compare.add_argument("--tokens", type=int, default=1024)
    compare.add_argument("--hidden", type=int, default=128)
    compare.add_argument("--vocab", type=int, default=16384)
    # every option is the runner's (passed through unparsed, --help included): see parse_args
    sub.add_parser("bench", add_help=False, help="the benchmark suites (python -m benchmarks.run; "
                                                 "`alignfast bench --help` lists its options)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; for `bench`, the arguments after it go to the runner as `runner_args`."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.runner_args = rest
        return args
    if args.command == "train":
        # key=value overrides may sit on both sides of the options (argparse stops the positional at the
        # first option), and `--resume key=value` is --resume (the latest checkpoint) then an override
        if args.resume_from is not None and "=" in args.resume_from:
            args.overrides, args.resume_from = [args.resume_from, *args.overrides], "latest"
        args.overrides += [r for r in rest if "=" in r and not r.startswith("-")]
        rest = [r for r in rest if not ("=" in r and not r.startswith("-"))]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def run_train(args) -> int:
    from alignfast.trainers import STAGES, TrainingStopped, load_config
    from alignfast.trainers.checkpoint import CheckpointError

    config_class, trainer_class = STAGES[args.stage]
    try:
        cfg = load_config(config_class, args.config, args.overrides, model=args.model, dataset=args.dataset,
                          output_dir=args.output_dir, resume_from=args.resume_from)
    except ValueError as e:
        print(f"alignfast: invalid configuration: {e}", file=sys.stderr)
        return 2
    try:  # what only the data and the models can tell (too few usable examples, a model id that is nowhere)
        trainer = trainer_class(cfg)
    except (ValueError, OSError) as e:
        print(f"alignfast: {e}", file=sys.stderr)
        return 2
    # TrainingStopped and CheckpointError reach every process together, so they end at the closing
    # barrier as a finished run does; any other error may be this process's alone, with the others
    # inside a collective: it propagates without the barrier (which would hang), and the launcher
    # (torchrun) tears the group down.
    try:
        metrics = trainer.train()
    except TrainingStopped as e:
        trainer.end_training()
        print(f"alignfast: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # resume_from: missing, torn, or another run's; an occupied output_dir
        trainer.end_training()
        print(f"alignfast: {e}", file=sys.stderr)
        return 2
    trainer.end_training()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"output_dir": cfg.output_dir, **metrics}))
    return 0


# ---- demo ---------------------------------------------------------------------------------------
def run_demo(args) -> int:
    """The pipeline demo (alignfast.demo): prints each stage's metrics as it goes, then the table."""
    from alignfast.demo import run_demo as demo

    result = demo(args.output_dir, quick=args.quick, seed=args.seed)
    width = max(len(r.metric) for r in result.rows)
    print(f"\n{'stage':<6} {'held-out metric':<{width}} {'before':>8} {'after':>8}")
    for r in result.rows:
        print(f"{r.stage:<6} {r.metric:<{width}} {r.before:>8.3f} {r.after:>8.3f}")
    print(f"\nreport: {os.path.join(args.output_dir, 'demo.md')} ({sum(result.seconds.values()):.0f} s)")
    return 0


# ---- compare ------------------------------------------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _measure(backend: str, n: int, h: int, v: int) -> dict:
    """Forward + backward of one backend: seconds and peak resident-memory growth (MiB).

    The peak is read from ru_maxrss, which only grows: backends run in order of increasing
    expected footprint (fused first, the materialising reference last), in one process."""
    import resource
    import time

    import torch

    from alignfast import linear_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    linear_logprobs(hidden[:8], weight, targets[:8], backend=backend).logprobs.sum().backward()  # warm-up
    hidden.grad = weight.grad = None
    base = _rss_kib()
    t0 = time.perf_counter()
    linear_logprobs(hidden, weight, targets, backend=backend).logprobs.sum().backward()
    seconds = time.perf_counter() - t0
    peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    return {"backend": backend, "seconds": seconds, "peak_mib": peak / 1024}


def run_compare(args) -> int:
    """A side-by-side table of the fused op vs the naive reference."""
    from alignfast import backends

    n, h, v = args.tokens, args.hidden, args.vocab
    print(f"linear_logprobs forward+backward, N={n} tokens, H={h}, V={v} (logits: {n * v * 4 / 2**20:.0f} MiB fp32)")
    names = [b for b in backends("cpu") if b not in ("reference", "triton")] + ["reference"]
    rows = [_measure(b, n, h, v) for b in names]
    ref = rows[-1]
    print(f"{'backend':<10} {'time (s)':>9} {'speed-up':>9} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r['backend']:<10} {r['seconds']:>9.3f} {ref['seconds'] / r['seconds']:>8.2f}x {r['peak_mib']:>15.1f}")
    return 0


# ---- bench --------------------------------------------------------------------------------------
def benchmarks_root() -> Path | None:
    """The source checkout holding benchmarks/: the one alignfast is installed from (editable), else
    the working directory; None when neither has it (an installed wheel ships no benchmarks)."""
    import alignfast

    for root in (Path(alignfast.__file__).resolve().parent.parent, Path.cwd()):
        if all((root / "benchmarks" / name).is_file() for name in ("run.py", "cases.py", "test_bench.py")):
            return root
    return None


def _out_from_cwd(runner_args: list[str]) -> list[str]:
    """The runner runs in the checkout's root: a relative --out stays relative to where the user is."""
    out, i = list(runner_args), 0
    while i < len(out):
        if out[i] == "--out" and i + 1 < len(out):
            out[i + 1] = os.path.abspath(out[i + 1])
            i += 1
        elif out[i].startswith("--out="):
            out[i] = "--out=" + os.path.abspath(out[i][len("--out="):])
        i += 1
    return out


def run_bench(args) -> int:
    """`python -m benchmarks.run ARGS` in the checkout's root; its exit status."""
    root = benchmarks_root()
    if root is None:
        print("alignfast bench: benchmarks/ not found. The benchmarks run from a source checkout of "
              "alignfast (git clone, `pip install -e .[bench]`, then `alignfast bench` in the clone); "
              "they are not part of the installed package.", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "benchmarks.run", *_out_from_cwd(args.runner_args)]
    return subprocess.call(cmd, cwd=root)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "train":
        return run_train(args)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "bench":
        return run_bench(args)
    return run_compare(args)


if __name__ == "__main__":
    sys.exit(main())
