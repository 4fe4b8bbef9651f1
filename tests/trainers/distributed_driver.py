"""Runs SFT then DPO (or KTO, GRPO, PPO) for a few steps on the tiny model; launched by
test_trainer_distributed.py.

    torchrun --nproc_per_node 2 distributed_driver.py MODEL OUT [--fsdp] [--stages sft,dpo]
    python distributed_driver.py MODEL OUT --batch 16          (the 1-process reference; or run(...))
    python distributed_driver.py MODEL OUT --batch 16 --replay TWO   (online stages: see _replay_samples)

Every process runs the same global batch (per-device batch × processes); rank 0 writes, per stage,
OUT/<stage>/metrics.jsonl and OUT/<stage>/model.safetensors (the final, full weights). The online
stages also write each process's sampled completions, OUT/<stage>/completions_<rank>.json.
"""
import argparse
import json
import os
import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402

from alignfast.data import toy  # noqa: E402
from alignfast.trainers import STAGES, load_config  # noqa: E402


def prompt_records(n):
    return [{"prompt": r["prompt"]} for r in toy.sft_records(n)]


def digit_fraction(prompts, completions, **kw):
    """The online stages' reward: the fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


RECORDS = {"sft": toy.sft_records, "dpo": toy.preference_records, "kto": toy.unpaired_records, "grpo": prompt_records,
           "ppo": prompt_records}
MAX_NEW_TOKENS = 6  # temperature 1, no top-k/top-p
ONLINE = [f"max_new_tokens={MAX_NEW_TOKENS}"]
EXTRA = {"sft": ["learning_rate=3e-3"], "dpo": ["learning_rate=3e-3", "beta=0.5"], "kto": ["learning_rate=3e-3"],
         "grpo": ["learning_rate=3e-3", "num_generations=2", "beta=0.1", *ONLINE],
         "ppo": ["learning_rate=3e-3", "num_ppo_epochs=1", *ONLINE]}


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=8, help="per-device batch size")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="sft,dpo")
    p.add_argument("--eval-examples", type=int, default=0, help="a held-out set of this many records")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--shard-head", action="store_true",
                   help="FSDP2: every nn.Linear (lm_head included) its own group, so the head stays sharded "
                        "outside its (never called) forward and the loss must gather it")
    p.add_argument("--replay", metavar="DIR",
                   help="online stages, 1 process: train on the completions the processes of the run in DIR "
                        "sampled, after checking each equals what this (unsharded) policy samples")
    return p.parse_args(argv)


def make_accelerator(args) -> Accelerator:
    acc = Accelerator(cpu=True)
    if args.fsdp:
        # Accelerate turns FSDP on for accelerator devices only (on CPU it stays DDP): switch the
        # shared state to FSDP2 by hand, so that `prepare` runs its real FSDP2 path (fully_shard).
        from accelerate.utils import DistributedType

        names = ["LlamaDecoderLayer"] + (["Linear"] if args.shard_head else [])
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=names, state_dict_type="FULL_STATE_DICT")
    return acc


def run(args, acc, gathers=(0,)) -> None:
    """Trains each stage; `gathers`: the counter of `_count_gathers` (main() only: it patches modeling)."""
    for stage in args.stages.split(","):
        config_class, trainer_class = STAGES[stage]
        cfg = load_config(config_class, None, [f"per_device_batch_size={args.batch}", f"max_steps={args.steps}",
                                               "disable_tqdm=true", "logging_steps=1", "max_length=32",
                                               "lr_scheduler=constant", *EXTRA[stage]],
                          model=args.model, output_dir=os.path.join(args.out, stage))
        online = stage in ("grpo", "ppo")
        held_out = {"eval_dataset": RECORDS[stage](args.eval_examples)} if args.eval_examples else {}
        trainer = trainer_class(cfg, train_dataset=RECORDS[stage](64), accelerator=acc, **held_out,
                                **({"reward_funcs": [digit_fraction]} if online else {}))
        if online and args.replay:
            _replay_samples(trainer, os.path.join(args.replay, stage))
        samples = _record_samples(trainer) if online else None
        before = gathers[0]
        trainer.train()
        if online:
            with open(os.path.join(args.out, stage, f"completions_{acc.process_index}.json"), "w") as f:
                json.dump(samples, f)
        if acc.is_main_process:
            with open(os.path.join(args.out, stage, "gathers.json"), "w") as f:
                json.dump({"gathers": gathers[0] - before, "fsdp": type(trainer.model).__name__.startswith("FSDP")}, f)


def _record_samples(trainer) -> list:
    """[(seed, prompt ids, completions)] of every `sample` call of `trainer`, in order."""
    calls, sample = [], trainer.sample

    def recording(examples, seed, sampling=None):
        completions = sample(examples, seed, sampling)
        calls.append((seed, [e["prompt_ids"] for e in examples], completions))
        return completions

    trainer.sample = recording
    return calls


def _replay_samples(trainer, recorded: str) -> None:
    """Makes the 1-process `trainer` sample what the processes of a run recorded in `recorded` did
    (their completions concatenated in rank order: the order of the global batch), asserting that each
    process's completions are those `sample_completions` gives with this trainer's unsharded policy,
    the same prompts and seed. So a sharded run must sample exactly as an unsharded model does.
    (GRPO: its advantages are per group, so 1 process then updates as 2 do; PPO whitens its advantages
    over each process's rollout, so a 1-process PPO run differs by design.)"""
    from alignfast.trainers.generation import sample_completions

    ranks = []
    while os.path.exists(path := os.path.join(recorded, f"completions_{len(ranks)}.json")):
        ranks.append(json.load(open(path)))
    steps = iter(zip(*ranks))

    def replay(examples, seed, sampling=None):
        calls = next(steps)
        assert [e["prompt_ids"] for e in examples] == [p for _, prompts, _ in calls for p in prompts]
        for rank, (rank_seed, prompts, completions) in enumerate(calls):
            mine = sample_completions(trainer.policy_lm(), prompts, sampling or trainer.cfg.sampling(),
                                      eos_token_id=trainer.tokenizer.eos_token_id,
                                      pad_token_id=trainer.tokenizer.pad_token_id, seed=rank_seed,
                                      batch_size=trainer.cfg.generation_batch_size)
            assert mine == completions, f"process {rank}, seed {rank_seed}: the completions differ"
        return [c for _, _, completions in calls for c in completions]

    trainer.sample = replay


def main():
    args = parse_args()
    acc = make_accelerator(args)
    run(args, acc, _count_gathers())
    acc.wait_for_everyone()  # as Trainer.end_training: no process tears the group down early
    acc.end_training()
    # Everything is written. Leave without the interpreter's teardown: once in ~20 FSDP2 runs under
    # load, a gloo thread still joinable there aborted rank 1 ("terminate called without an active
    # exception") after a run that had finished and matched.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _count_gathers():
    """Counts the explicit gathers of a sharded lm_head weight (`modeling._gather_dtensor`)."""
    from alignfast.trainers import modeling

    calls, original = [0], modeling._gather_dtensor

    def counted(t):
        calls[0] += 1
        return original(t)

    modeling._gather_dtensor = counted
    return calls


if __name__ == "__main__":
    main()
