"""Atomic, verifiable, resumable checkpoints.

    output_dir/checkpoint-000040/
        model.safetensors      the trained module's weights (safetensors: no code runs on load)
        optimizer.pt           optimizer state   } loaded with torch.load(weights_only=True)
        scheduler.pt           scheduler state   }
        rng_state_<rank>.pt    python, numpy and torch RNG states of each process
        trainer_state.json     step (the data position), run id, config hash, counters
        config.json            the full config
        manifest.json          sha256 of every file above: a corrupted checkpoint is refused

Under FSDP2 (parameters sharded as DTensors) the model and optimizer states are gathered into full
state dicts (`torch.distributed.checkpoint.state_dict`, every process takes part) and written by the
main process, so the files are the same whatever the sharding.

A checkpoint is written into `.checkpoint-000040.tmp` and renamed into place when complete, so a
process killed mid-write leaves the previous checkpoint intact and no half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE_FILE, MANIFEST, CONFIG_FILE = "trainer_state.json", "manifest.json", "config.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or from another run."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, torn or fail their checksums (not one of another run)."""


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": (version, list(mt), gauss),
             "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_sharded(model) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict:
    """The full (unsharded) model state dict; under FSDP2 a collective, complete on the main process."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := NAME.match(name))]
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str, step: int, *, model, optimizer, scheduler, state: dict,
                    config: dict, keep: int | None = None) -> str:
    """Writes checkpoint-<step> atomically (every process calls this). Returns its path."""
    name = f"checkpoint-{step:06d}"
    final, tmp = os.path.join(output_dir, name), os.path.join(output_dir, f".{name}.tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    sharded = is_sharded(model)
    if sharded:  # collectives: every process gathers
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model_state = full_model_state(model)
        optim_state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if main:
        if sharded:
            save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "model.safetensors"))
            torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        else:
            save_model(model, os.path.join(tmp, "model.safetensors"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "step": step, "num_processes": accelerator.num_processes}, f, indent=1)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1, default=str)
    accelerator.wait_for_everyone()
    if main:
        files = sorted(os.listdir(tmp))
        for fname in files:
            _fsync(os.path.join(tmp, fname))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({fname: _sha256(os.path.join(tmp, fname)) for fname in files}, f, indent=1)
        _fsync(os.path.join(tmp, MANIFEST))
        old = os.path.join(output_dir, f".{name}.old")
        if os.path.exists(final):  # same step written again: set the old one aside until the new is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(output_dir)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            for _, old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_candidates(resume_from: str, output_dir: str) -> list[str]:
    """The checkpoints to try, in order: the one named, or for "latest" every one in output_dir,
    newest first (a torn newest one falls back to the one before)."""
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest: no checkpoint-* directory in {output_dir!r}")
        return [path for _, path in reversed(found)]
    if not os.path.isdir(resume_from):
        raise CheckpointError(f"resume_from: {resume_from!r} is not a directory")
    return [resume_from]


def clear_for_new_run(output_dir: str, overwrite: bool, delete: bool = True) -> None:
    """Before a run that does not resume: refuse an output_dir that holds checkpoints (a new run
    there would prune them as its own, and a later --resume could pick one of them up), or, with
    `overwrite`, delete them (where `delete`: the main process)."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return
    if not overwrite:
        raise CheckpointError(
            f"output_dir {output_dir!r} holds checkpoints of an earlier run ({os.path.basename(found[-1][1])}"
            f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}): continue it with --resume, or start "
            "over in another output_dir or with overwrite_output_dir=true (deletes them)")
    for _, path in found if delete else ():
        shutil.rmtree(path)


def verify_checkpoint(path: str, config_hash: str | tuple[str, ...]) -> dict:
    """The checkpoint's trainer state, after checking every file against the manifest and the run's
    config hash (or one of several the run accepts, its own first). Raises CheckpointError saying what is
    wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CorruptCheckpoint(f"checkpoint {path!r} is incomplete or not a checkpoint: no {MANIFEST}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"checkpoint {path!r} is corrupted: unreadable {MANIFEST} ({e})") from None
    for fname, digest in manifest.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CorruptCheckpoint(f"checkpoint {path!r} is corrupted: {fname} is missing")
        if _sha256(fpath) != digest:
            raise CorruptCheckpoint(f"checkpoint {path!r} is corrupted: {fname} does not match its checksum")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    accepted = (config_hash,) if isinstance(config_hash, str) else tuple(config_hash)
    if state.get("config_hash") not in accepted:
        raise CheckpointError(
            f"checkpoint {path!r} belongs to another run: its config hash is {state.get('config_hash')!r}, "
            f"this run's is {accepted[0]!r} (different model, data, or hyper-parameters)")
    return state


def load_checkpoint(accelerator, path: str, *, model, optimizer, scheduler,
                    config_hash: str | tuple[str, ...]) -> dict:
    """Restores weights, optimizer, scheduler and this process's RNG; returns the trainer state."""
    state = verify_checkpoint(path, config_hash)
    if state.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {path!r} was written by {state.get('num_processes')} process(es), "
                              f"this run has {accelerator.num_processes}: the data order would differ")
    optim_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    if is_sharded(model):  # every process reads the full states and keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_file(os.path.join(path, "model.safetensors")), options=options)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    else:
        load_model(model, os.path.join(path, "model.safetensors"), strict=True)
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    set_rng_state(torch.load(os.path.join(path, f"rng_state_{accelerator.process_index}.pt"), weights_only=True))
    return state
