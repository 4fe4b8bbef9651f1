"""Training configuration: dataclasses, loaded from a YAML file plus `key=value` overrides and
validated before any model is loaded (a bad value is a `ValueError` naming its key).

    cfg = load_config(DPOConfig, "examples/dpo.yaml", ["beta=0.2", "learning_rate=1e-6"])
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from alignfast.data.sources import is_hub_id

SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
REPORT_TO = ("jsonl", "tensorboard", "wandb")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Fields that do not change what is trained: a run resumed with other values is the same run.
# Fields naming files or model directories: in a run's identity, relative to the folder holding output_dir.
PATH_FIELDS = {"model", "tokenizer", "dataset", "eval_dataset", "ref_model", "reward_model", "value_model",
               "feedback_model", "constitution"}
NOT_HASHED = {"resume_from", "overwrite_output_dir", "output_dir", "logging_steps", "eval_steps", "save_steps",
              "save_total_limit", "report_to", "disable_tqdm", "run_name", "max_bad_steps"}


def opt(default, help: str, **kw):
    """A config field with its help text (shown by `alignfast train <stage> --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Options every stage shares."""

    # model and data
    model: str | None = opt(None, "local directory (or hub id) of a Hugging Face causal LM")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model's")
    dataset: str | None = opt(None, "local .jsonl/.json/.parquet file, a `datasets` directory or a hub id, "
                                    "in TRL's column conventions")
    dataset_split: str = opt("train", "the split of a hub dataset or a saved DatasetDict")
    eval_dataset: str | None = opt(None, "held-out data (as `dataset`); default: `eval_fraction` of `dataset`")
    eval_split: str = opt("test", "the split of `eval_dataset` when it is a hub dataset or a DatasetDict")
    eval_fraction: float = opt(0.0, "fraction of `dataset` held out for evaluation when no eval_dataset")
    on_bad_record: str = opt("error", "malformed record: 'error' (stop, naming it) or 'skip' (warn, drop)")
    max_length: int | None = opt(512, "max tokens of prompt + completion (completion cut first)")
    output_dir: str = opt("outputs/run", "where checkpoints, metrics.jsonl and the final model go")
    run_name: str | None = opt(None, "name in the logs; default: from the config hash")
    dtype: str = opt("float32", "model weights dtype: float32, bfloat16 or float16")
    attn_implementation: str = opt("auto", "auto (flash_attention_2 on a GPU with flash_attn installed, else "
                                           "sdpa), or one of transformers': sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = opt(False, "allow a model's own Python code (off: no foreign code runs)")
    use_peft: bool = opt(False, "train LoRA adapters (needs `peft`)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "modules LoRA adapts")
    # optimisation
    learning_rate: float = opt(1e-5, "AdamW peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (not on biases and norms)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: no clipping)")
    lr_scheduler: str = opt("linear", "linear, cosine or constant (after warmup)")
    warmup_steps: int = opt(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of the total steps")
    per_device_batch_size: int = opt(8, "examples per micro-batch per process (pairs for preference data)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    num_epochs: float = opt(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps; -1: from num_epochs")
    seed: int = opt(42, "seed of the model init, data order and dropout")
    backend: str = opt("auto", "fused-op backend: auto or one of alignfast.backends()")
    chunk_size: int | None = opt(None, "tokens per chunk for the chunked backends")
    cpu: bool = opt(False, "run on CPU even when a GPU is present")
    # logging, evaluation, checkpoints
    logging_steps: int = opt(10, "log every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N steps (0: only at the end, if there is eval data)")
    save_steps: int = opt(0, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = opt(2, "keep at most N checkpoints (None: all)")
    resume_from: str | None = opt(None, "checkpoint directory to resume from, or 'latest' in output_dir")
    overwrite_output_dir: bool = opt(False, "a new run in an output_dir holding checkpoints deletes them first "
                                            "(off: such a run is refused, so another run's are never lost)")
    max_bad_steps: int = opt(5, "stop after this many non-finite losses in a row")
    report_to: list = opt(["jsonl"], "jsonl (always), tensorboard, wandb")
    disable_tqdm: bool = opt(False, "no progress bar")

    stage = "base"
    data_kind = "sft"

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the first bad key. Touches no model. Values are first brought to
        their fields' types as `load_config` does (a config built in Python gets the same checks)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if not self.model or not isinstance(self.model, str):
            raise ValueError("model: a model path is required (--model or model=...)")
        _check_model_path("model", self.model)
        if self.tokenizer is not None:
            _check_model_path("tokenizer", self.tokenizer)
        for key in ("dataset", "eval_dataset"):
            value = getattr(self, key)
            if isinstance(value, str) and not (os.path.exists(value) or is_hub_id(value)):
                raise ValueError(f"{key}: {value!r} is neither an existing file or directory nor a hub id")
        _choice(self, "on_bad_record", ("error", "skip"))
        _choice(self, "dtype", DTYPES)
        if not isinstance(self.attn_implementation, str) or not self.attn_implementation:
            raise ValueError(f"attn_implementation must be a name, got {self.attn_implementation!r}")
        if self.attn_implementation.startswith("flash_attention_2") and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(f"attn_implementation={self.attn_implementation!r} needs the flash_attn package")
        _choice(self, "lr_scheduler", SCHEDULERS)
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
            _positive(self, key)
        for key in ("learning_rate", "adam_epsilon", "max_bad_steps"):
            _positive(self, key)
        if self.max_length is not None:
            _positive(self, "max_length")
        for key in ("weight_decay", "max_grad_norm", "warmup_steps", "eval_steps", "save_steps", "lora_dropout"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("adam_beta1", "adam_beta2", "warmup_ratio", "eval_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 or -1, got {self.max_steps!r}")
        if self.max_steps == -1 and not self.num_epochs > 0:
            raise ValueError(f"num_epochs must be > 0 when max_steps=-1, got {self.num_epochs!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit!r}")
        if self.chunk_size is not None:
            _positive(self, "chunk_size")
        from alignfast.dispatch import ALL_BACKENDS

        if self.backend != "auto" and self.backend not in ALL_BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is unknown; choose auto or one of {list(ALL_BACKENDS)}")
        for target in self.report_to:
            if target not in REPORT_TO:
                raise ValueError(f"report_to: {target!r} is unknown; choose from {list(REPORT_TO)}")
            module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(target)
            if target == "tensorboard" and importlib.util.find_spec("tensorboard") is None or \
                    target == "wandb" and importlib.util.find_spec("wandb") is None:
                raise ValueError(f"report_to: {target!r} asked for but {module} is not installed")
        if self.use_peft and importlib.util.find_spec("peft") is None:
            raise ValueError("use_peft: LoRA needs the `peft` package (pip install peft)")
        if self.use_peft:
            _positive(self, "lora_r")
        return self

    # ---- identity -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self, portable: bool = True) -> dict:
        """The options that determine the trained weights (not logging/checkpoint cadence), with the
        paths (PATH_FIELDS) beside output_dir relative to the folder holding it (`portable`)."""
        base = os.path.dirname(os.path.abspath(self.output_dir))
        return {k: _portable_path(v, base) if portable and k in PATH_FIELDS else v
                for k, v in self.to_dict().items() if k not in NOT_HASHED}

    def config_hash(self, portable: bool = True) -> str:
        """Hash of `identity()` and the stage; `portable=False`: as runs before the paths were made
        portable hashed them (their checkpoints still resume: `Trainer` accepts both)."""
        d = self.identity(portable)
        d["stage"] = self.stage
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def options(cls) -> list[tuple[str, object, str]]:
        """(name, default, help) of every option, for --help."""
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def _portable_path(value, base: str):
    """An existing path beside the output_dir (the folder holding it), as relative to that folder:
    runs that read each other's outputs (cai's stages: `model=<dir>/sl`, `output_dir=<dir>/rl`) keep
    their identity, and resume, when the folder holding them all is moved or renamed."""
    if not isinstance(value, str) or not value or not os.path.exists(value):
        return value
    path = os.path.abspath(value)
    if os.path.commonpath([path, base]) != base or base == os.path.dirname(base):
        return value
    return "<beside output_dir>/" + os.path.relpath(path, base).replace(os.sep, "/")


def _check_model_path(key: str, value: str) -> None:
    if os.path.isdir(value):
        return
    local_looking = value.startswith((".", "/", "~")) or os.sep in value and not HUB_ID.match(value)
    # `out/sft` reads as a hub id, but when `out/` is a local directory it is a missing local model
    missing_local = HUB_ID.match(value) and os.path.isdir(value.split("/")[0])
    if local_looking or missing_local or not HUB_ID.match(value):
        raise ValueError(f"{key}: {value!r} is not an existing directory (nor a hub id like org/name)")


def _choice(cfg, key: str, choices) -> None:
    if getattr(cfg, key) not in choices:
        raise ValueError(f"{key}: {getattr(cfg, key)!r} is unknown; choose one of {list(choices)}")


def _positive(cfg, key: str) -> None:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")


# ---- loading ----------------------------------------------------------------------------------
def parse_overrides(pairs) -> dict:
    """["beta=0.1", "report_to=[jsonl]"] -> {"beta": 0.1, "report_to": ["jsonl"]} (YAML scalars)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            raise ValueError(f"override {pair!r}: {value!r} is not a valid YAML value") from None
    return out


def _coerce(key: str, value, annotation):
    """Checks/converts a YAML value to the field's type; ValueError naming the key if it cannot."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {})  # noqa: S307
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) in (
        typing.Union, types.UnionType) else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} cannot be empty")
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if base is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is list or typing.get_origin(base) is list:
            return list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",")]
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value


def make_config(cls, values: dict):
    """A validated `cls` from a dict: unknown keys and badly typed values are ValueErrors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for `{cls.stage}`; "
                         f"see `alignfast train {cls.stage} --help`")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs).validate()


def load_config(cls, path=None, overrides=None, **values):
    """`cls` from a YAML file (safe_load), then `values`, then `key=value` overrides; validated."""
    merged = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config: file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config: {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {path!r} must hold a mapping of key: value")
        merged.update(data)
    merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(parse_overrides(overrides))
    return make_config(cls, merged)
