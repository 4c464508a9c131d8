"""Resumable backprop checkpoints: `<out>/checkpoints/step-<k>/`.

Each holds `trainable.safetensors` (the trained parameters only), `optimizer.pt` and
`scheduler.pt` (state dicts: plain tensors and numbers, read back with weights_only=True) and
`meta.json` {method, model_id, fingerprint, step, params}. A checkpoint is refused when its
method, model or parameter set differs from the run that resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compressor.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger("compressor")
_PREFIX = "step-"


def model_identity(model: nn.Module) -> dict[str, str]:
    """A name for the model and a fingerprint of its architecture (parameter names and shapes)."""
    config = getattr(model, "config", None)
    name_or_path = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return {
        "model_id": Path(name_or_path).name or name_or_path,
        "fingerprint": digest.hexdigest()[:16],
    }


def check_identity(meta: dict, method: str, identity: dict, where: Path) -> None:
    """Raise ConfigError unless `meta` (from a checkpoint or log) matches this run."""
    ours = {"method": method, **identity}
    for key in ("method", "model_id", "fingerprint"):
        if meta.get(key) != ours[key]:
            raise ConfigError(
                f"`resume`: {str(where)!r} was written by method `{meta.get('method')}` on model "
                f"`{meta.get('model_id')}` (fingerprint {meta.get('fingerprint')}); this run is method "
                f"`{method}` on model `{identity['model_id']}` (fingerprint {identity['fingerprint']}); "
                "point `resume` at a run of the same method and model, or drop `resume`"
            )


def save_checkpoint(
    out_dir: Path, step: int, meta: dict, params: dict[str, Tensor], optimizer, scheduler
) -> Path:
    """Write step-`step` atomically (temp folder, then rename) and return its path."""
    root = Path(out_dir) / CHECKPOINT_DIR
    final, tmp = root / f"{_PREFIX}{step}", root / f".{_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in params.items()}
    save_file(tensors, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "meta.json").write_text(
        json.dumps({**meta, "step": step, "params": sorted(params)}, indent=1)
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(resume: str | Path) -> Path:
    """The newest step-<k> folder under `resume` (a run folder, its checkpoints folder, or a step)."""
    path = Path(resume)
    if (path / "meta.json").is_file():
        return path
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = sorted(
        (int(p.name[len(_PREFIX) :]), p)
        for p in root.glob(f"{_PREFIX}*")
        if p.name[len(_PREFIX) :].isdigit() and (p / "meta.json").is_file()
    )
    if not steps:
        raise ConfigError(
            f"`resume`: no checkpoint found in {str(path)!r} (looked for {CHECKPOINT_DIR}/{_PREFIX}<k>/meta.json); "
            "give the output folder of a run trained with `checkpoint_every` > 0"
        )
    return steps[-1][1]


def load_checkpoint(
    resume: str | Path,
    method: str,
    identity: dict,
    params: dict[str, nn.Parameter],
    optimizer,
    scheduler,
) -> int:
    """Load the newest checkpoint under `resume` into params/optimizer/scheduler; return its step."""
    folder = latest_checkpoint(resume)
    meta = json.loads((folder / "meta.json").read_text())
    check_identity(meta, method, identity, folder)
    if sorted(meta["params"]) != sorted(params):
        missing = sorted(set(meta["params"]) ^ set(params))[:5]
        raise ConfigError(
            f"`resume`: {str(folder)!r} trained a different parameter set (differs in e.g. {missing}); "
            "resume with the same `targets` and adapter settings"
        )
    tensors = load_file(folder / "trainable.safetensors")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return int(meta["step"])


# The pipeline stages outputs in `<parent>/.<name>.tmp-XXXX` and deletes that folder when a run
# fails, so an interrupted run would lose its checkpoints. Move them to `<parent>/<name>.partial`.
_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]+$")
PROGRESS_FILES = (CHECKPOINT_DIR, "mezo_log.jsonl")


def preserve_progress(out_dir: Path | None) -> Path | None:
    """Move checkpoints and the MeZO log out of a staging folder that is about to vanish.

    Returns the folder to pass as `resume`, or None when there was nothing to move.
    """
    if out_dir is None:
        return None
    out_dir = Path(out_dir)
    match = _STAGING.match(out_dir.name)
    present = [out_dir / name for name in PROGRESS_FILES if (out_dir / name).exists()]
    if match is None or not present:
        return out_dir if present else None  # not staged: the files stay where they are
    from compressor.outdir import read_marker, write_marker

    target = out_dir.parent / f"{match['name']}.partial"
    if target.exists() and read_marker(target) is not None:
        shutil.rmtree(target, ignore_errors=True)  # an older interruption's progress, ours
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        shutil.rmtree(target / path.name, ignore_errors=True)
        shutil.move(str(path), str(target / path.name))
    write_marker(target, "training progress (resume from it)")
    log.warning(
        "training stopped early; its progress is in %s (pass it as `resume` to continue)", target
    )
    return target
