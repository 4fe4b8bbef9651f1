"""Runs SFT then DPO for a few steps on the tiny model; launched by test_trainer_distributed.py.

    torchrun --nproc_per_node 2 distributed_driver.py MODEL OUT [--fsdp] [--stages sft,dpo]
    python distributed_driver.py MODEL OUT --batch 16          (the 1-process reference; or run(...))

Every process runs the same global batch (per-device batch × processes); rank 0 writes, per stage,
OUT/<stage>/metrics.jsonl and OUT/<stage>/model.safetensors (the final, full weights).
"""
import argparse
import json
import os

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402

from alignfast.data import toy  # noqa: E402
from alignfast.trainers import STAGES, load_config  # noqa: E402

RECORDS = {"sft": toy.sft_records, "dpo": toy.preference_records}
EXTRA = {"sft": ["learning_rate=3e-3"], "dpo": ["learning_rate=3e-3", "beta=0.5"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=8, help="per-device batch size")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="sft,dpo")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--shard-head", action="store_true",
                   help="FSDP2: every nn.Linear (lm_head included) its own group, so the head stays sharded "
                        "outside its (never called) forward and the loss must gather it")
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
        trainer = trainer_class(cfg, train_dataset=RECORDS[stage](64), accelerator=acc)
        before = gathers[0]
        trainer.train()
        if acc.is_main_process:
            with open(os.path.join(args.out, stage, "gathers.json"), "w") as f:
                json.dump({"gathers": gathers[0] - before, "fsdp": type(trainer.model).__name__.startswith("FSDP")}, f)


def main():
    args = parse_args()
    acc = make_accelerator(args)
    run(args, acc, _count_gathers())
    acc.end_training()


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
