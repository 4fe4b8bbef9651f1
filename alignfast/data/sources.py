"""Records from a local JSONL / JSON / Parquet file, a `datasets` dataset, or a Python list."""
from __future__ import annotations

import json
import os


def load_records(source) -> list[dict]:
    """A list of dict records from `source`: a list of dicts, a `datasets.Dataset`, or a local path
    ending in .jsonl, .json or .parquet. A line of a JSONL file that is not valid JSON is kept as a
    string, so it is reported as a malformed record (with its index) rather than failing the load."""
    if isinstance(source, (list, tuple)):
        return list(source)
    if hasattr(source, "to_list"):  # datasets.Dataset
        return source.to_list()
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"dataset must be a path or a list of records, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"dataset file {path!r} does not exist (hub datasets are not fetched: save it locally)")
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


def write_jsonl(records, path) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
