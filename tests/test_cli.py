"""The `alignfast` command: --help lists every option, bad values exit early, a tiny run, the kernel
comparison, the demo's arguments (the demo itself: tests/demo)."""
import json
import os
import subprocess
import sys

import pytest

from alignfast.cli import build_parser, main, parse_args
from alignfast.trainers import STAGES


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_lists_every_option_with_default(stage, capsys):
    with pytest.raises(SystemExit):
        main(["train", stage, "--help"])
    text = capsys.readouterr().out
    for name, default, _ in STAGES[stage][0].options():
        assert f"  {name} " in text and repr(default) in text, name


def test_bad_value_fails_before_loading(capsys, tmp_path):
    assert main(["train", "dpo", "--model", str(tmp_path / "missing"), "beta=0"]) == 2
    assert "model" in capsys.readouterr().err
    model = tmp_path / "m"
    model.mkdir()  # exists but is no model: the beta check must fire first, before any load
    assert main(["train", "dpo", "--model", str(model), "beta=0"]) == 2
    assert "beta" in capsys.readouterr().err


def test_train_sft_from_the_command_line(tmp_path, capsys):
    import torch

    from alignfast.data import toy, write_jsonl
    from alignfast.models.tiny import save_tiny

    torch.set_num_threads(1)
    model = save_tiny(tmp_path / "m")
    data = write_jsonl(toy.sft_records(16), tmp_path / "d.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("per_device_batch_size: 8\nmax_steps: 2\ndisable_tqdm: true\n")
    rc = main(["train", "sft", "--config", str(cfg), "--model", model, "--dataset", data,
               "--output-dir", str(tmp_path / "o"), "learning_rate=1e-3"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["output_dir"] == str(tmp_path / "o") and out["loss"] > 0


def test_overrides_on_both_sides_of_the_options_and_after_resume():
    args = parse_args(["train", "dpo", "beta=0.2", "--model", "m", "max_steps=1", "--resume", "seed=3"])
    assert args.overrides == ["seed=3", "beta=0.2", "max_steps=1"] and args.resume_from == "latest"
    assert parse_args(["train", "sft", "--resume", "out/checkpoint-2"]).resume_from == "out/checkpoint-2"
    with pytest.raises(SystemExit):
        parse_args(["train", "sft", "--no-such-flag"])


def test_errors_only_the_data_or_checkpoint_can_tell_exit_cleanly(tmp_path, capsys):
    """Too few examples for one batch, and a resume from a missing checkpoint: a message, status 2."""
    import torch

    from alignfast.data import toy, write_jsonl
    from alignfast.models.tiny import save_tiny

    torch.set_num_threads(1)
    model = save_tiny(tmp_path / "m")
    data = write_jsonl(toy.sft_records(4), tmp_path / "d.jsonl")
    common = ["train", "sft", "--model", model, "--dataset", data, "--output-dir", str(tmp_path / "o")]
    assert main([*common, "per_device_batch_size=64", "max_steps=1"]) == 2
    assert "per_device_batch_size" in capsys.readouterr().err
    assert main([*common, "per_device_batch_size=2", "max_steps=1", f"resume_from={tmp_path / 'nope'}"]) == 2
    assert "nope" in capsys.readouterr().err


def test_examples_parse():
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    import yaml

    for stage in STAGES:
        path = os.path.join(root, f"{stage}.yaml")
        with open(path) as f:
            keys = set(yaml.safe_load(f))
        assert keys <= {name for name, _, _ in STAGES[stage][0].options()}, path


def test_compare_runs_small():
    out = subprocess.run([sys.executable, "-m", "alignfast.cli", "compare", "--tokens", "64", "--hidden", "32",
                          "--vocab", "500"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout and "chunked" in out.stdout


def test_demo_arguments():
    parser = build_parser()
    args = parser.parse_args(["demo"])
    assert (args.output_dir, args.quick, args.seed) == ("outputs/demo", False, 0)
    args = parser.parse_args(["demo", "--output-dir", "d", "--quick", "--seed", "3"])
    assert (args.output_dir, args.quick, args.seed) == ("d", True, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--tokens", "64"])  # the kernel table's flags belong to `compare`


def test_parser_has_all_stages():
    parser = build_parser()
    assert parser.parse_args(["train", "kto", "beta=0.2"]).overrides == ["beta=0.2"]


def test_bench_arguments_go_to_the_runner():
    from alignfast.cli import parse_args

    args = parse_args(["bench", "--suite", "cpu-models", "--dry-run", "--only", "Gemma-2-2B", "--help"])
    assert args.runner_args == ["--suite", "cpu-models", "--dry-run", "--only", "Gemma-2-2B", "--help"]
    with pytest.raises(SystemExit):
        parse_args(["demo", "--suite", "smoke"])   # other commands still reject unknown options


def test_bench_relative_out_is_from_the_callers_directory(tmp_path, monkeypatch):
    from alignfast.cli import _out_from_cwd

    monkeypatch.chdir(tmp_path)
    assert _out_from_cwd(["--quick", "--out", "r", "--out=s"]) == ["--quick", "--out", str(tmp_path / "r"),
                                                                   f"--out={tmp_path / 's'}"]


def test_bench_dry_run_lists_the_smoke_suite(capfd):
    assert main(["bench", "--quick", "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert "suite smoke" in out and "linear_logprobs-naive-N256-H64-V4096-fp32" in out


def test_bench_outside_a_checkout_says_so(monkeypatch, capsys):
    from alignfast import cli

    monkeypatch.setattr(cli, "benchmarks_root", lambda: None)
    assert main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err
