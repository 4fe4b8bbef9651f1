"""Records from a local JSONL / JSON / Parquet file, a `datasets` dataset (in memory, saved to a
directory, or a hub id), or a Python list."""
from __future__ import annotations

import json
import os
import re

# what `datasets.load_dataset` takes for a hub dataset: "name" or "org/name", no path-like prefix
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_records(source, split: str = "train") -> list[dict]:
    """A list of dict records from `source`: a list of dicts, a `datasets.Dataset`, a local path
    ending in .jsonl, .json or .parquet, a directory (`Dataset.save_to_disk`'s, or data files
    `datasets.load_dataset` reads), or a hub id such as `trl-lib/ultrafeedback_binarized` (its
    `split`; fetched by `datasets`, or read from its cache when offline). A line of a JSONL file that
    is not valid JSON is kept as a string, so it is reported as a malformed record (with its index)
    rather than failing the load."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if hasattr(source, "to_list"):  # datasets.Dataset
        return source.to_list()
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"dataset must be a path or a list of records, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path) or (not os.path.isfile(path) and is_hub_id(path)):
        return _load_with_datasets(path, split)
    if not os.path.isfile(path):
        raise ValueError(f"dataset file {path!r} does not exist")
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append(line.rstrip("\n"))
        return records
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of records")
        return data
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"dataset {path!r}: unsupported extension (use .jsonl, .json or .parquet)")


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and not value.endswith((".jsonl", ".json", ".parquet"))


def _load_with_datasets(path: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"dataset {path!r}: reading a directory or hub id needs `pip install datasets`") from e
    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"dataset {path!r} has no split {split!r} (splits: {sorted(loaded)})")
            loaded = loaded[split]
        return loaded.to_list()
    try:
        return datasets.load_dataset(path, split=split).to_list()
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise ValueError(f"dataset {path!r} (split {split!r}) could not be loaded: {e}") from e


def write_jsonl(records, path) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
