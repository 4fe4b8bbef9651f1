"""Datasets in TRL's column conventions, their encoding, collators and the built-in toy data."""
from alignfast.data.collators import (IGNORE_INDEX, PreferenceCollator, RolloutCollator, SFTCollator,
    UnpairedCollator)
from alignfast.data.encode import PreparedDataset, encode_record, prepare_dataset
from alignfast.data.formats import BadRecord, check_record
from alignfast.data.sources import load_records, write_jsonl

__all__ = ["IGNORE_INDEX", "BadRecord", "PreferenceCollator", "PreparedDataset", "RolloutCollator", "SFTCollator",
           "UnpairedCollator", "check_record", "encode_record", "load_records", "prepare_dataset",
           "write_jsonl"]
