"""The MeZO optimizer: SPSA maths, the replay log and `run_mezo`, the loop `fit` runs for
`optimizer: mezo` (the algorithm and the log are described in compressor/training/mezo.py, the
`mezo` stage, which builds on `fit` and so sits above this module)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from compressor.errors import ConfigError
from compressor.kernels.dispatch import mezo_axpy_, mezo_normal
from compressor.training.checkpoint import check_identity, check_trajectory, progress_folder
from compressor.training.run import TrainRun, checksum, decays

LOG_NAME = "mezo_log.jsonl"
LOG_FORMAT = 1


# -- the maths: pure functions on parameter lists ---------------------------------------------


def param_offsets(params: list[Tensor]) -> list[int]:
    """Start of each tensor in the shared noise stream: the running sum of the numels before it."""
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    return offsets


def step_seed(base_seed: int, step: int) -> int:
    """The fresh seed of `step`: a hash of (base seed, step), so runs and resumes agree."""
    digest = hashlib.sha256(f"mezo:{base_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # < 2**56, inside the kernel's int64 range


@torch.no_grad()
def perturb_(params: list[Tensor], seed: int, scale: float) -> None:
    """In place theta_i += scale * z_i for every tensor, z regenerated from (seed, offset_i)."""
    for param, offset in zip(params, param_offsets(params)):
        mezo_axpy_(param.data, seed, offset, scale)


def noise(params: list[Tensor], seed: int) -> list[Tensor]:
    """The z tensors of `seed`, materialised (for tests and inspection only; training never does)."""
    return [
        mezo_normal(p.numel(), seed, offset, dtype=p.dtype, device=p.device).view(p.shape)
        for p, offset in zip(params, param_offsets(params))
    ]


@torch.no_grad()
def spsa_gradient(
    params: list[Tensor], loss_at: Callable[[], float], seed: int, eps: float
) -> tuple[float, float, float]:
    """Perturb +eps, -2eps, +eps (restoring theta) and return (g, loss_plus, loss_minus)."""
    perturb_(params, seed, eps)
    loss_plus = float(loss_at())
    perturb_(params, seed, -2.0 * eps)
    loss_minus = float(loss_at())
    perturb_(params, seed, eps)
    return (loss_plus - loss_minus) / (2.0 * eps), loss_plus, loss_minus


@torch.no_grad()
def mezo_update_(
    params: list[Tensor], seed: int, grad: float, lr: float, weight_decay: float, decay: list[bool]
) -> None:
    """theta <- theta - lr * (grad * z + weight_decay * theta), decay only where `decay[i]`."""
    for param, offset, decayed in zip(params, param_offsets(params), decay):
        if decayed and weight_decay:
            param.data.mul_(1.0 - lr * weight_decay)
        mezo_axpy_(param.data, seed, offset, -lr * grad)


@torch.no_grad()
def replay_(
    params: list[Tensor], records: list[dict], eps: float, weight_decay: float, decay: list[bool]
) -> None:
    """Re-apply logged steps; perturb/restore is repeated so rounding matches the original run."""
    for record in records:
        perturb_(params, record["seed"], eps)
        perturb_(params, record["seed"], -2.0 * eps)
        perturb_(params, record["seed"], eps)
        mezo_update_(
            params, record["seed"], record["projected_grad"], record["lr"], weight_decay, decay
        )


# -- the log ----------------------------------------------------------------------------------


def log_header(run: TrainRun) -> dict:
    return {
        "type": "header", "format": LOG_FORMAT, "method": run.method, **run.identity,
        "params": list(run.params), "eps": run.config.mezo_eps, "weight_decay": run.config.weight_decay,
        "init_checksum": checksum(run.params), "seed": run.seed, "config": run.meta()["config"],
    }  # fmt: skip


def read_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, step records) of a MeZO log, given the file or the run folder holding it."""
    path = Path(path)
    path = progress_folder(path, LOG_NAME) / LOG_NAME if path.is_dir() or not path.exists() else path
    if not path.is_file():
        raise ConfigError(
            f"`resume`: no MeZO log at {str(path)!r}; give the output folder of a mezo run (it holds {LOG_NAME})"
        )
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("type") != "header":
        raise ConfigError(f"`resume`: {str(path)!r} is not a MeZO log (no header line)")
    return lines[0], lines[1:]


def _check_replayable(header: dict, records: list[dict], run: TrainRun, where: str) -> None:
    check_identity(header, run.method, run.identity, Path(where))
    check_trajectory(header.get("config"), run.meta()["config"], Path(where), len(records))
    if header["params"] != list(run.params) or header["eps"] != run.config.mezo_eps:
        raise ConfigError(
            f"`resume`: {where!r} perturbed other parameters or another `mezo_eps` ({header['eps']}); "
            "resume with the same targets, adapter and mezo_eps"
        )
    if abs(header["init_checksum"] - checksum(run.params)) > 1e-6 * max(
        1.0, abs(header["init_checksum"])
    ):
        raise ConfigError(
            f"`resume`: the initial weights differ from those {where!r} started from; a MeZO log only "
            "replays onto the exact weights it began with (same checkpoint, same adapter seed)"
        )


class MezoLog:
    """Append-only JSONL log; a no-op sink when the run has no output folder."""

    def __init__(self, path: Path | None, header: dict, records: list[dict]):
        self.records = list(records)
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("w")
            for line in [header, *records]:
                self._handle.write(json.dumps(line) + "\n")
            self._handle.flush()

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()  # a killed run keeps every finished step

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


# -- the loop ---------------------------------------------------------------------------------


def _resume(run: TrainRun, params: list[Tensor], decay: list[bool]) -> list[dict]:
    """Replay the previous run's log onto the (initial) weights; returns the replayed records."""
    header, records = read_log(run.config.resume)
    _check_replayable(header, records, run, str(run.config.resume))
    records = [r for r in records if r["step"] < run.config.steps]
    replay_(params, records, run.config.mezo_eps, run.config.weight_decay, decay)
    run.start_step = len(records)
    return records


def run_mezo(run: TrainRun) -> None:
    """MeZO steps from `start_step` to `config.steps`; every step is logged before the next."""
    config = run.config
    params = list(run.params.values())
    decay = [decays(n, p) for n, p in run.params.items()]
    header = log_header(run)
    records = _resume(run, params, decay) if config.resume else []
    log = MezoLog(
        run.out_dir / LOG_NAME if run.out_dir and run.runtime.is_main else None, header, records
    )
    run.model.eval()  # dropout off: both losses must see the same function
    try:
        with run, torch.no_grad():
            for step in range(run.start_step, config.steps):
                batch = run.batch(step)
                seed = step_seed(run.seed, step)
                grad, loss_plus, loss_minus = spsa_gradient(
                    params, lambda b=batch: run.loss_fn(run.model, b).item(), seed, config.mezo_eps
                )
                # Distributed: same seed on every rank, own data shard; one all-reduce of the
                # projected gradient (and of the two losses, so the log is the global batch's).
                grad, loss_plus, loss_minus = run.runtime.means_across_ranks([grad, loss_plus, loss_minus])
                lr = run.lr_at(step)
                mezo_update_(params, seed, grad, lr, config.weight_decay, decay)
                log.append({"step": step, "seed": seed, "projected_grad": grad, "lr": lr,
                            "loss_plus": loss_plus, "loss_minus": loss_minus})  # fmt: skip
                run.record(step, 0.5 * (loss_plus + loss_minus))
                if run.diverged_at is not None:
                    break  # the pipeline refuses to publish a diverged result
    finally:
        log.close()
