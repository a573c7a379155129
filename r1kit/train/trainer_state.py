"""Checkpoints that survive a crash, and exact resume from them.

A checkpoint is `output_dir/checkpoint-<step>/`: a Hugging Face folder (config.json, safetensors,
tokenizer) that loads anywhere, plus `trainer_state/`:
    state.json     step, data position, data fingerprint, batch geometry, recipe, last metrics
    optimizer.pt   AdamW moments keyed by parameter name (same for 1 process, DDP, FSDP)
    training.pt    LR-scheduler state and every rank's RNG states (python, numpy, torch, cuda)

The folder is built under a temporary name, fsynced and renamed into place (r1kit.checkpoint.
atomic_dir); state.json is the last file written inside. A crash mid-write leaves only a hidden
`.checkpoint-<step>.*.partial` folder, which is never mistaken for a checkpoint. Old checkpoints
beyond `save_total_limit` are renamed away before they are deleted, for the same reason.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from r1kit.checkpoint import PARTIAL_SUFFIX, atomic_dir, atomic_write_text, is_partial

STATE_DIR = "trainer_state"
STATE_FILE = "state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- finding checkpoints


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_DIR / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def partial_folders(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir)
    return sorted(p for p in root.glob(f".checkpoint-*{PARTIAL_SUFFIX}")) if root.is_dir() else []


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """"" -> None; "latest" -> the newest complete checkpoint in output_dir (None when there is
    none yet: a run killed before its first save restarts); a path -> that checkpoint, checked."""
    if not resume:
        return None
    if resume in ("latest", "true", "True", "1"):
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if is_partial(path) or path.name.endswith(PARTIAL_SUFFIX) or ".deleting" in path.name:
        raise ValueError(
            f"{path} is a partial checkpoint left by a crash before it was renamed into place; it is "
            f"incomplete and is never loaded. Resume from the newest complete checkpoint instead "
            f"(resume_from_checkpoint=latest or one of: "
            f"{', '.join(p.name for _, p in list_checkpoints(path.parent)) or 'none found'})")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; use resume_from_checkpoint=latest "
                                "to continue the newest one in output_dir")
    if not (path / STATE_DIR / STATE_FILE).is_file():
        raise ValueError(f"{path} has no {STATE_DIR}/{STATE_FILE}: it is a model folder, not a trainer "
                         "checkpoint. To start a new run from its weights set model={path} instead")
    return path


def check_same_model(checkpoint: Path, config) -> None:
    """A resume must continue the same architecture; name the keys that differ."""
    from r1kit.model import ModelConfig

    saved = ModelConfig.from_file(checkpoint).to_hf()
    current = config.to_hf()
    ignore = {"torch_dtype", "architectures", "transformers_version"}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
             for k in sorted((set(saved) | set(current)) - ignore) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"{checkpoint} holds a different model than this run configures "
                         f"({'; '.join(diffs[:5])}); resume with the recipe that wrote it, or start a new "
                         "run in another output_dir")


# ---------------------------------------------------------------------------- writing


def _test_kill(var: str, step: int) -> None:
    # Test hook: die without any cleanup, as a crash or an OOM-killer would.
    if os.environ.get(var) and int(os.environ[var]) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, optimizer_state: dict,
                    scheduler_state: dict, rng_states: list[dict], state: dict[str, Any]) -> Path:
    """Write checkpoint-<step> atomically (call on rank 0 only). `model` is a Transformer with the
    full weights (under FSDP, a CPU copy built from the gathered state)."""
    from r1kit.model.hf import save as save_hf

    path = Path(output_dir) / checkpoint_name(step)
    with atomic_dir(path) as tmp:
        save_hf(model, tokenizer, tmp)  # itself atomic: it replaces the (still empty) temp folder
        (tmp / STATE_DIR).mkdir()
        torch.save(optimizer_state, tmp / STATE_DIR / "optimizer.pt")
        torch.save({"scheduler": scheduler_state, "rng": rng_states}, tmp / STATE_DIR / "training.pt")
        _test_kill("R1KIT_TEST_KILL_IN_SAVE", step)
        atomic_write_text(tmp / STATE_DIR / STATE_FILE, json.dumps(state, indent=2, default=str))
    return path


def rotate(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        doomed = path.parent / f".{path.name}.deleting{PARTIAL_SUFFIX}"
        os.replace(path, doomed)  # no longer looks like a checkpoint, even if the delete is cut short
        shutil.rmtree(doomed, ignore_errors=True)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path) / STATE_DIR
    try:
        state = json.loads((path / STATE_FILE).read_text())
        state["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: unreadable trainer state ({err}); resume from an earlier checkpoint") from None
    state["scheduler"] = training["scheduler"]
    state["rng"] = training["rng"]
    return state
