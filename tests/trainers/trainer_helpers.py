"""Shared construction of tiny, fast runs."""
from alignfast.data import toy
from alignfast.trainers import STAGES, load_config

RECORDS = {"sft": toy.sft_records, "reward": toy.preference_records, "dpo": toy.preference_records,
           "kto": toy.unpaired_records}
FAST = ["per_device_batch_size=8", "disable_tqdm=true", "logging_steps=1", "max_length=32"]


def make_trainer(stage, model_dir, out_dir, overrides=(), n_records=32, records=None, **kw):
    config_class, trainer_class = STAGES[stage]
    cfg = load_config(config_class, None, FAST + list(overrides), model=model_dir, output_dir=str(out_dir))
    return trainer_class(cfg, train_dataset=records if records is not None else RECORDS[stage](n_records), **kw)
