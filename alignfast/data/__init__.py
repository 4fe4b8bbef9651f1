"""Datasets in TRL's column conventions, their encoding, collators and the built-in toy data."""
from alignfast.data.collators import (IGNORE_INDEX, PreferenceCollator, RolloutCollator, SFTCollator,
    UnpairedCollator)
from alignfast.data.encode import PreparedDataset, encode_record, prepare_dataset
from alignfast.data.formats import BadRecord, check_record
from alignfast.data.packing import PackedCollator, best_fit_decreasing, pack_examples, packed_inputs
from alignfast.data.sources import load_records, write_jsonl

__all__ = ["IGNORE_INDEX", "BadRecord", "PackedCollator", "PreferenceCollator", "PreparedDataset",
           "RolloutCollator", "SFTCollator", "UnpairedCollator", "best_fit_decreasing", "check_record",
           "encode_record", "load_records", "pack_examples", "packed_inputs", "prepare_dataset", "write_jsonl"]
