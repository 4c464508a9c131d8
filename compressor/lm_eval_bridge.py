"""lm-evaluation-harness task scores of the model as the tool holds it in memory.

The model object itself (factored, N:M, dense×sparse, quantized or with an adapter) goes to
lm-eval's `HFLM` wrapper: nothing is merged or reloaded, so the scores are those of the layers
`compressor.load` rebuilt. lm-eval 0.4.x is an optional extra (`pip install "compressor[eval]"`).

Tasks come from, in this order: the folders given (`--tasks-dir`, recipe `evaluate.tasks_dir`),
the offline task shipped in `compressor/assets/tasks/` (`tinystories_cloze`), then lm-eval's own
catalogue (scanned only when a name is not found in the first two: the scan takes seconds).
Scores are {task: {metric: value}} with lm-eval's "metric,filter" keys turned into `metric`
(filter `none`) or `metric_filter`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from .config import did_you_mean
from .errors import ConfigError, DataError

SHIPPED_TASKS = Path(__file__).parent / "assets" / "tasks"
OFFLINE_TASK = "tinystories_cloze"
INSTALL = 'pip install "compressor[eval]" (or pip install "lm-eval>=0.4,<0.5")'


def import_lm_eval():
    """The lm_eval package, or a one-line error with the install command."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"task scores need lm-evaluation-harness 0.4.x, which is not installed ({err}); "
                          f"{INSTALL}") from None
    version = getattr(lm_eval, "__version__", "0.4")
    if not version.startswith("0.4"):
        raise ConfigError(f"task scores need lm-evaluation-harness 0.4.x, found {version}; {INSTALL}")
    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # its per-task chatter is not ours to print
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


def task_folders(tasks_dir: str | Path | None) -> list[str]:
    """The user's task folder (checked) and the shipped one."""
    folders = []
    if tasks_dir is not None:
        path = Path(tasks_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"`--tasks-dir` {str(tasks_dir)!r} is not a folder; pass the folder holding your "
                              "lm-eval task YAML files")
        folders.append(str(path.resolve()))
    return [*folders, str(SHIPPED_TASKS)]


def task_manager(tasks: list[str], tasks_dir: str | Path | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`, or a ConfigError with a
    did-you-mean for the first unknown one."""
    folders = tuple(task_folders(tasks_dir))
    manager = _indexed(folders, False)
    if all(name in manager.all_tasks for name in tasks):
        return manager  # no scan of lm-eval's catalogue (thousands of YAML files)
    manager = _indexed(folders, True)
    for name in tasks:
        if name not in manager.all_tasks:
            raise ConfigError(f"unknown lm-eval task `{name}`{did_you_mean(name, manager.all_tasks)}; "
                              f"`lm-eval ls tasks` lists them, `{OFFLINE_TASK}` runs offline, and --tasks-dir "
                              "adds a folder of task YAML files")
    return manager


@functools.lru_cache(maxsize=4)
def _indexed(folders: tuple[str, ...], include_defaults: bool):
    """One TaskManager per set of folders and process: indexing lm-eval's catalogue takes seconds."""
    return import_lm_eval().tasks.TaskManager(include_path=list(folders), include_defaults=include_defaults)


def check_tasks(tasks: list[str], tasks_dir: str | Path | None = None):
    """Before a model loads: lm-eval is installed, every task exists and its data can be read
    (a Hub dataset without network is refused here, naming the offline way). Returns the manager."""
    manager = task_manager(tasks, tasks_dir)
    for name in tasks:
        try:
            manager.load([name])
        except Exception as err:  # lm-eval and datasets raise many kinds; ours is the one line
            raise DataError(_load_failure(name, err)) from None
    return manager


def _load_failure(task: str, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    network = ("connect", "offline", "resolve", "network", "timed out", "couldn't reach", "max retries",
               "name or service", "cannot find the requested files", "localentrynotfound")
    if offline or any(word in text.lower() for word in network):
        return (f"task `{task}` needs its data from the Hugging Face Hub, which cannot be reached ({text}); run it "
                "once online to fill the HF cache, or use a task YAML with local data files (--tasks-dir DIR); "
                f"`{OFFLINE_TASK}` is shipped and runs offline")
    return f"task `{task}` could not be loaded ({text}); check the task YAML and its data files"


def task_scores(model: nn.Module, tokenizer, tasks: list[str], *, tasks_dir: str | Path | None = None,
                batch_size: int = 8, manager=None, quiet: bool = False) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval scores of `model` (used as it is) on `tasks`: {task: {metric: value}}.
    `quiet` hides lm-eval's progress bars (tqdm writes them to sys.stderr)."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or check_tasks(tasks, tasks_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=False)
    scores = {task: _metrics(values) for task, values in results["results"].items()}
    bad = [f"{t}/{m} = {v}" for t, ms in scores.items() for m, v in ms.items() if not math.isfinite(v)]
    if bad:
        raise DataError(f"lm-eval returned a non-finite score ({bad[0]}); the model's outputs are broken "
                        "(check `compressor eval` perplexity on the same model)")
    return scores


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.8, "alias": ...} -> {"acc": 0.8}; non-numbers (N/A stderr) dropped."""
    out = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
    return out


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}, the columns of a report's quality table."""
    return {f"{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}
