"""Resumable backprop checkpoints: `<out>/checkpoints/step-<k>/`.

Each holds `trainable.safetensors` (the trained parameters only), `optimizer.pt` and
`scheduler.pt` (state dicts: plain tensors and numbers, read back with weights_only=True) and
`meta.json` {method, model_id, fingerprint, base_hash, config, step, params}. Resuming is exact
or refused: the checkpoint must come from the same method, architecture (`fingerprint`) and base
weights (`base_hash`, a content hash, not the folder name), every config field that shapes the
trajectory (lr, seed, data, batch, ...; see `check_trajectory`) must match, and `steps` may only
grow (and only on a constant schedule, whose past does not depend on `steps`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compressor.errors import ConfigError
from compressor.outdir import CHECKPOINT_DIR

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


@torch.no_grad()
def weights_hash(model: nn.Module) -> str:
    """A content hash of every parameter (name, dtype, shape and bytes); meta tensors by shape only."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)};".encode())
        if param.device.type != "meta":
            digest.update(param.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def check_identity(meta: dict, method: str, identity: dict, where: Path) -> None:
    """Raise ConfigError unless `meta` (from a checkpoint or log) matches this run."""
    ours = {"method": method, **identity}
    for key in ("method", "fingerprint"):
        if meta.get(key) != ours[key]:
            raise ConfigError(
                f"`resume`: {str(where)!r} was written by method `{meta.get('method')}` on model "
                f"`{meta.get('model_id')}` (fingerprint {meta.get('fingerprint')}); this run is method "
                f"`{method}` on model `{identity['model_id']}` (fingerprint {identity['fingerprint']}); "
                "point `resume` at a run of the same method and model, or drop `resume`"
            )
    if meta.get("base_hash") and identity.get("base_hash") and meta["base_hash"] != identity["base_hash"]:
        raise ConfigError(
            f"`resume`: `model`: {str(where)!r} trained from other base weights (content hash "
            f"{meta['base_hash']}, this run's {identity['base_hash']}); resume on the same model "
            "(and the same adapter seed), or drop `resume`"
        )


# Fields that do not change the weights a run reaches; all other config fields must match.
NOT_TRAJECTORY = ("steps", "resume", "eval_every", "eval_data", "num_eval", "checkpoint_every", "log_every")


def check_trajectory(saved: dict | None, ours: dict, where: Path, step: int) -> None:
    """ConfigError naming the first field that would make a resumed run differ from an
    uninterrupted one: a trajectory field that changed, `steps` below the checkpoint's step, or
    `steps` changed under a schedule that depends on it."""
    if step > ours["steps"]:
        raise ConfigError(
            f"`resume`: `steps` is {ours['steps']} but {str(where)!r} is already at step {step}; "
            f"`steps` may only grow: pass --steps {step} or more"
        )
    if saved is None:  # a checkpoint written before configs were recorded
        return
    ours = json.loads(json.dumps(ours, default=str))
    for key in sorted(set(saved) | set(ours)):
        if key not in NOT_TRAJECTORY and saved.get(key) != ours.get(key):
            raise ConfigError(
                f"`resume`: `{key}` is {ours.get(key)!r} but {str(where)!r} was trained with "
                f"{saved.get(key)!r}; resume with the same `{key}` (or drop `resume` to start over)"
            )
    if saved["steps"] != ours["steps"] and ours.get("schedule", "constant") != "constant":
        raise ConfigError(
            f"`resume`: `steps` changed ({saved['steps']} -> {ours['steps']}) but the `{ours['schedule']}` "
            "schedule depends on it; resume with the same `steps`, or use schedule: constant"
        )


def save_checkpoint(
    out_dir: Path, step: int, meta: dict, params: dict[str, Tensor], optimizer, scheduler
) -> Path:
    """Write step-`step` atomically (temp folder, then rename) and return its path."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{_PREFIX}{step}.tmp-", dir=root))  # created exclusively
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


def progress_folder(resume: str | Path, wanted: str) -> Path:
    """`resume`, or its `.partial` sibling (an interrupted run's progress) when only that holds
    `wanted` (a checkpoints folder or a MeZO log)."""
    path = Path(resume)
    partial = path.with_name(path.name + ".partial")
    if not (path / wanted).exists() and (partial / wanted).exists():
        return partial
    return path


def latest_checkpoint(resume: str | Path) -> Path:
    """The newest step-<k> folder under `resume` (a run folder, its checkpoints folder, or a step)."""
    path = Path(resume)
    if (path / "meta.json").is_file():
        return path
    path = progress_folder(path, CHECKPOINT_DIR)
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
    meta_now: dict,
    params: dict[str, nn.Parameter],
    optimizer,
    scheduler,
    out_dir: Path | None = None,
) -> int:
    """Load the newest checkpoint under `resume` into params/optimizer/scheduler; return its step.

    `meta_now` is this run's {method, **identity, config}. The checkpoint is copied into
    `out_dir/checkpoints` so the new output can be resumed from again."""
    folder = latest_checkpoint(resume)
    meta = read_meta(folder)
    check_identity(meta, meta_now["method"], meta_now, folder)
    check_trajectory(meta.get("config"), meta_now["config"], folder, meta["step"])
    if sorted(meta["params"]) != sorted(params):
        missing = sorted(set(meta["params"]) ^ set(params))[:5]
        raise ConfigError(
            f"`resume`: {str(folder)!r} trained a different parameter set (differs in e.g. {missing}); "
            "resume with the same `targets` and adapter settings"
        )
    tensors = _read_part(folder / "trainable.safetensors", load_file)
    for name, param in params.items():
        stored = tensors.get(name)
        if stored is None or tuple(stored.shape) != tuple(param.shape):
            found = "missing" if stored is None else f"of shape {list(stored.shape)}"
            raise ConfigError(f"`resume`: tensor `{name}` in {str(folder / 'trainable.safetensors')!r} is {found}, "
                              f"this run trains {list(param.shape)}; the checkpoint is damaged: resume from an "
                              "earlier step or drop `resume`")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    for part, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        state = _read_part(folder / part, lambda path: torch.load(path, weights_only=True))
        try:
            target.load_state_dict(state)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise ConfigError(f"`resume`: {str(folder / part)!r} does not fit this run ({type(err).__name__}: "
                              f"{str(err)[:80]}); resume from an earlier step or drop `resume`") from None
    if out_dir is not None and (Path(out_dir) / CHECKPOINT_DIR / folder.name).resolve() != folder.resolve():
        shutil.copytree(folder, Path(out_dir) / CHECKPOINT_DIR / folder.name, dirs_exist_ok=True)
    return meta["step"]


def read_meta(folder: Path) -> dict:
    """A checkpoint's meta.json, checked: a mapping whose `step` is an integer >= 0 and whose
    `params` is a list of names (ConfigError naming the file and the field otherwise)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"`resume`: cannot read {str(path)!r} ({type(err).__name__}); the checkpoint is "
                          "damaged: resume from an earlier step or drop `resume`") from None
    step = meta.get("step") if isinstance(meta, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"`resume`: {str(path)!r} has `step` {step!r}, not an integer >= 0; the checkpoint "
                          "is damaged: resume from an earlier step or drop `resume`")
    if not isinstance(meta.get("params"), list):
        raise ConfigError(f"`resume`: {str(path)!r} has no `params` list; the checkpoint is damaged: resume "
                          "from an earlier step or drop `resume`")
    return meta


def _read_part(path: Path, read):
    """`read(path)`, with a one-line ConfigError naming the file when it is missing or unreadable."""
    try:
        return read(path)
    except Exception as err:  # torch/safetensors raise many types on a truncated or empty file
        if type(err).__name__ == "UnpicklingError":
            raise  # the CLI's message for a pickle that is more than plain tensors
        raise ConfigError(f"`resume`: cannot read {str(path)!r} ({type(err).__name__}: {str(err)[:80]}); the "
                          "checkpoint is damaged: resume from an earlier step or drop `resume`") from None
