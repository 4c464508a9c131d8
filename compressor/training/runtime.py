"""Where the training loop runs: one process with plain torch, or several under `accelerate launch`.

Single process (the usual case, and every test): plain torch, `torch.autocast` for mixed
precision and a GradScaler for fp16 on CUDA. Launched by `accelerate launch` or `torchrun`
(WORLD_SIZE > 1): an `accelerate.Accelerator` prepares the model and optimizer (DDP, or FSDP when
the accelerate config says so) and each rank reads its own micro-batches (see `shard`). The
training loop is the same code in both cases:

    accelerate config                      # once: DDP or FSDP, number of processes, precision
    accelerate launch -m compressor.cli.main finetune --method backprop MODEL --data DATA --out OUT

On CPUs: `accelerate launch --multi_gpu --num_processes 2 ... --device cpu` (gloo). `--cpu
--num_processes 2` starts ONE process in accelerate 1.x unless an MPI hostfile is given.
tests/test_distributed.py proves two CPU ranks equal one process at the same global batch
(backprop, lora, heal, mezo, resume). FSDP is not exercised there: on CPUs `--use_fsdp` stops in
torch ("sync_module_states=True is not supported on cpu"), so it needs GPUs to test.

With FSDP and a parameter subset (adapters), set `fsdp_use_orig_params: true` in the accelerate
config so the optimizer still sees the original parameters. Only rank 0 writes checkpoints.

Why not an Accelerator in one process too: accelerate keeps one global state per process and
refuses a second Accelerator with another precision, which breaks successive runs in one session.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from compressor.memory import max_rss_mb, proc_status_mb
from compressor.offload import is_dispatched

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Runtime:
    """Device placement, autocast, backward and optimizer step for one or many processes."""

    def __init__(self, mixed_precision: str, device: torch.device):
        self.mixed_precision = mixed_precision
        self.accelerator = None
        if launched_distributed():
            from accelerate import Accelerator  # imported only when actually launched

            # cpu=True is what makes accelerate use gloo (MULTI_CPU) on a machine without GPUs.
            on_cpu = torch.device(device).type == "cpu" or not torch.cuda.is_available()
            self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)
            device = self.accelerator.device
        self.device = torch.device(device)
        fp16_cuda = (
            mixed_precision == "fp16" and self.device.type == "cuda" and self.accelerator is None
        )
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, micro_index: int) -> int:
        """Global micro-batch index of this rank's share of `micro_index` (disjoint across ranks)."""
        return micro_index * self.world_size + self.rank

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.accelerator is not None:
            return self.accelerator.prepare(model, optimizer)
        if is_dispatched(model):  # accelerate's hooks own placement (and refuse `.to`): keep it
            return model, optimizer
        return model.to(self.device), optimizer

    def autocast(self):
        if self.mixed_precision == "no" or self.accelerator is not None:
            return contextlib.nullcontext()  # accelerate wraps the forward itself
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mixed_precision])

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float
    ) -> None:
        """Unscale (fp16), clip the global gradient norm, then step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm > 0:
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def mean_across_ranks(self, value: float) -> float:
        return self.means_across_ranks([value])[0]

    def means_across_ranks(self, values: list[float]) -> list[float]:
        """Each value averaged over the ranks, in one all-reduce (one process: unchanged)."""
        if self.accelerator is None:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="mean").tolist()


class PeakMemory:
    """Peak memory during a stretch of code: CUDA allocator peak, or the process's peak RSS.

    On Linux the RSS high-water mark can be reset (`/proc/self/clear_refs` <- "5"), so the CPU
    figure covers only the measured stretch; elsewhere it is the process-lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        peak = proc_status_mb("VmHWM")
        return peak if peak is not None else max_rss_mb()
