"""Pipeline: one object built from a YAML recipe or CLI flags; runs stages, evaluates before and
after, applies quality gates, and writes the report (and checkpoint) atomically."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import evaluation
from .config import MethodConfig
from .context import Context, resolve_device
from .dtypes import output_dtype
from .errors import ConfigError, GateError, ModelError
from .export import check_stages, export_beside
from .lm_eval_bridge import check_tasks, flat_scores, task_scores
from .models import (
    DEFAULT_MODEL_DIR,
    LoadedModel,
    cast_safetensors_file,
    load_model,
    read_manifest,
    save_checkpoint,
)
from .offload import check_offload_ready, gather_to_cpu, nonfinite_tensors, parse_max_memory
from .outdir import claim_output, remove_if_ours, resolved
from .preflight import (
    check_device,
    check_max_memory,
    check_seq_lens,
    check_supported,
    context_of,
    model_context,
)
from .recipe import RunConfig, apply_overrides, load_recipe
from .registry import Method, get_method, method_info
from .report import Report, StageRecord, write_report
from .report.env import collect_env
from .report.size import folder_bytes, model_size, size_summary, weight_file_bytes
from .targeting import is_selected


@dataclass
class Stage:
    """One parsed stage: its method (looked up once, when the recipe is parsed) and its config."""

    name: str
    config: MethodConfig
    method: Method

    @property
    def kind(self) -> str:
        return self.method.kind

    @functools.cached_property
    def fields(self) -> dict[str, Any]:
        """The config as plain values, computed once (the config is frozen); read-only."""
        return self.config.to_dict()


@dataclass
class Pipeline:
    """The stages (parsed by their methods' configs) and the run's top-level settings."""

    stages: list[Stage]
    config: RunConfig
    _task_manager: Any = field(default=None, init=False, repr=False)  # lm-eval's, set by _preflight

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> Pipeline:
        """Validate every level before any model loads; errors name the stage index."""
        config = RunConfig.from_dict(copy.deepcopy(recipe))
        stages = [parse_stage(i, spec) for i, spec in enumerate(config.stage_specs())]
        if config.export is not None:
            check_stages(config.export, [(s.name, s.fields) for s in stages])
        return cls(stages=stages, config=config)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> Pipeline:
        return cls.from_recipe(load_recipe(path, overrides))

    @classmethod
    def from_flags(cls, method: str, fields: dict[str, Any], overrides: list[str] | None = None,
                   **top: Any) -> Pipeline:
        """The CLI path: one stage from flags, then `--set` overrides, validated like a recipe."""
        recipe = {k: v for k, v in top.items() if v is not None}
        recipe["stages"] = [{"method": method, **{k: v for k, v in fields.items() if v is not None}}]
        return cls.from_recipe(apply_overrides(recipe, overrides or []))

    def to_recipe(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), saved beside the outputs."""
        return self.config.to_recipe([{"method": s.name, **copy.deepcopy(s.fields)} for s in self.stages])

    @property
    def out(self) -> Path | None:
        return Path(self.config.out) if self.config.out else None

    @property
    def evaluate(self) -> dict[str, Any] | None:
        """The evaluation protocol as the Context and the stages read it (None = no evaluation)."""
        return self.config.evaluate.to_dict() if self.config.evaluate is not None else None

    # -- running ------------------------------------------------------------------------------
    def run(self, *, quiet: bool = False, loaded: LoadedModel | None = None) -> tuple[Report, LoadedModel]:
        """Run every stage; write outputs if `out` is set. Raises GateError after writing
        the report when a quality gate is missed."""
        self._preflight()
        with self._claim() as claim:  # checks and locks `out` before anything loads
            torch.manual_seed(self.config.seed)
            started = time.perf_counter()
            device = resolve_device(self.config.device)
            if loaded is None:
                loaded = self._load(device, quiet)
            self._check_loaded(loaded)
            report = self._start_report(loaded, device)
            if claim is None:
                self._run_unwritten(loaded, report, device, quiet, started)
            else:
                self._run_and_publish(claim, loaded, report, device, quiet, started)
        self._raise_missed_gates(report)
        return report, loaded

    def _load(self, device, quiet: bool) -> LoadedModel:
        """The model, in float32 (loading a large or GGUF model can take minutes: a progress line)."""
        with Context(quiet=quiet).waiting(f"loading {self.config.model or 'the embedded stories260K'}"):
            return load_model(self.config.model, device=device, dtype="float32",
                              trust_remote_code=self.config.trust_remote_code, load_in=self.config.load_in,
                              max_memory=self.config.max_memory, offload_folder=self.config.offload_folder)

    def _check_loaded(self, loaded: LoadedModel) -> None:
        """What needs the loaded model to refuse: window lengths against its context, stage support."""
        check_seq_lens(self._seq_lens(), context_of(getattr(loaded.model, "config", None) or {}))
        check_supported(self.stages, loaded.model, loaded.causal, self.evaluate is not None)
        dtype = output_dtype(self.config.dtype, loaded.source_dtype)
        for stage in self.stages:  # a method's own checks against the model (gptq: a reachable byte budget)
            if stage.method.check_model is not None:
                stage.method.check_model(stage.config, loaded.model, dtype)

    def _start_report(self, loaded: LoadedModel, device) -> Report:
        report = Report(run={**collect_env(device, self.config.seed), "model": loaded.source,
                             "model_class": type(loaded.model).__name__})
        report.size = {"before": {**model_size(loaded.model, loaded.source_dtype),
                                  "disk_bytes": _source_disk_bytes(loaded.source)}}
        return report

    def _run_unwritten(self, loaded: LoadedModel, report: Report, device, quiet: bool, started: float) -> None:
        """Under torchrun / accelerate launch only rank 0 writes `out`; the other ranks stage into a
        scratch folder (training checkpoints need one) that is deleted afterwards."""
        with scratch_dir(self.out is not None) as tmp:
            self._run_stages(loaded, report, tmp, device, quiet)
        self._judge(report, started)

    def _run_and_publish(self, claim, loaded: LoadedModel, report: Report, device, quiet: bool,
                         started: float) -> None:
        """The stages, the model and the report written into the claim's staging folder, which is
        then published as `out`; checkpoints of a resumed `.partial` run were copied in, so it goes."""
        with claim.stage() as tmp:
            ctx, reference = self._run_stages(loaded, report, tmp, device, quiet, after=False)
            written = self._write_model(loaded, report, tmp)
            if self._measures(loaded):  # "after" is scored on what was written, as `eval OUT` scores it
                self._evaluate_written(written, loaded, ctx, report, reference)
            self._judge(report, started)  # judged before writing, so report.md shows them
            self._write_report(report, tmp)
            claim.publish(tmp, command=" -> ".join(s.name for s in self.stages),
                          problems=result_problems(loaded, report))
        for resume in self._resumes():
            if resume.name.endswith(".partial"):
                remove_if_ours(resume)

    def _judge(self, report: Report, started: float) -> None:
        """Wall time and the quality gates, recorded in the report (raised after writing it)."""
        report.run["seconds"] = time.perf_counter() - started
        report.gates = evaluate_gates(self.config.gates.active(), report.evaluation)

    def _preflight(self) -> None:
        """What can be refused before the model loads: device, offload budget, window lengths."""
        check_device(self.config.device)
        if self.config.max_memory is not None:
            check_max_memory(parse_max_memory(self.config.max_memory))
        if self.config.max_memory is not None or self.config.offload_folder is not None:
            check_offload_ready({s.name: method_info(s.name) for s in self.stages})
        check_seq_lens(self._seq_lens(), model_context(self.config.model))
        refuse_adapter_on_compressed(self.stages, self.config.model)
        if self.evaluate and self.evaluate["tasks"]:  # lm-eval installed, tasks known, data readable
            self._task_manager = check_tasks(list(self.evaluate["tasks"]), self.evaluate["tasks_dir"])

    def _seq_lens(self) -> list[tuple[str, int]]:
        lens = [("evaluate.seq_len", self.evaluate["seq_len"])] if self.evaluate else []
        return lens + [(f"stages[{i}].{key}", value) for i, s in enumerate(self.stages)
                       for key, value in s.fields.items() if key == "seq_len" or key.endswith("_seq_len")]

    def _claim(self):
        if self.out is None or secondary_rank():
            return contextlib.nullcontext()
        fields = [s.fields for s in self.stages]
        # Resuming a run into its own output folder replaces it: that is what was asked for.
        overwrite = self.config.overwrite or resolved(self.out) in self._resumes()
        inputs = [self.config.model, *(v for f in fields for k, v in f.items() if isinstance(v, str) and k != "resume")]
        return claim_output(self.out, overwrite=overwrite, inputs=inputs)

    def _measures(self, loaded: LoadedModel) -> bool:
        """Whether quality is scored before and after (stages that change the model, a tokenizer)."""
        modifies = any(s.kind != "analyze" for s in self.stages)
        return modifies and self.evaluate is not None and loaded.tokenizer is not None

    def _run_stages(self, loaded: LoadedModel, report: Report, tmp: Path | None, device, quiet: bool,
                    after: bool = True) -> tuple[Context, Any]:
        """Score "before", run the stages, and score "after" in memory when `after` (nothing is
        written). Returns the context and the "before" reference (an encoder's embeddings)."""
        ctx = Context(tokenizer=loaded.tokenizer, device=device, seed=self.config.seed, out_dir=tmp,
                      model_source=loaded.source, quiet=quiet, text_column=self.config.text_column,
                      evaluate=self.evaluate, checkpoint_dtype=output_dtype(self.config.dtype, loaded.source_dtype))
        modifies = any(s.kind != "analyze" for s in self.stages)
        if modifies:
            bad = nonfinite_tensors(loaded.model)
            if bad:
                raise ModelError(f"{len(bad)} parameter(s) hold NaN/Inf: {', '.join(bad[:5])}; the checkpoint is "
                                 "corrupt — re-export it or restore the original weights")
        measure = self._measures(loaded)
        blocks = int(getattr(getattr(loaded.model, "config", None), "num_hidden_layers", 0) or 0)
        reference = None
        if measure:  # the plan, then an estimate from the timed "before" pass
            self._say(ctx, "plan: " + " → ".join(plan_steps(self.stages, self.evaluate, blocks)))
            started = time.perf_counter()
            reference = self._evaluate(loaded, ctx, report, "before")
            per_window = (time.perf_counter() - started) / max(self.evaluate["num_windows"], 1)
            self._say(ctx, estimate_line(self.stages, self.evaluate, blocks, per_window))
        for stage in self.stages:
            report.add(self._run_stage(stage, loaded, ctx))
        if measure and after:
            self._evaluate(loaded, ctx, report, "after", reference)
        return ctx, reference

    @staticmethod
    def _say(ctx: Context, line: str) -> None:
        if not ctx.quiet:
            ctx.console.print(line, highlight=False, soft_wrap=True)

    def _evaluate_written(self, written: bool, loaded: LoadedModel, ctx: Context, report: Report,
                          reference) -> None:
        """Score "after" on the folder just written (checkpoint or base + adapter), loaded as
        `compressor eval` loads it, so its dtype rounding counts. A model offloaded or loaded in
        4/8 bit is scored in memory: reloading it whole may not fit."""
        in_place = self.config.max_memory or self.config.offload_folder or self.config.load_in
        if not written or in_place:
            self._evaluate(loaded, ctx, report, "after", reference)
            return
        with ctx.waiting("loading what was written, to score it"):
            reloaded = load_model(str(ctx.out_dir), device=ctx.device, trust_remote_code=self.config.trust_remote_code)
        self._evaluate(reloaded, ctx, report, "after", reference)

    def _run_stage(self, stage: Stage, loaded: LoadedModel, ctx: Context) -> StageRecord:
        method = stage.method
        rss_before = _peak_rss_mb()
        start = time.perf_counter()
        result = method.apply(loaded.model, stage.config, ctx)
        seconds = time.perf_counter() - start
        metrics = {**result.metrics}
        metrics.setdefault("peak_rss_mb", _peak_rss_mb())
        metrics.setdefault("peak_rss_growth_mb", max(0.0, _peak_rss_mb() - rss_before))
        return StageRecord(stage=stage.name, kind=method.kind, config=copy.deepcopy(stage.fields), metrics=metrics,
                           per_module=result.per_module, notes=result.notes, curves=result.curves,
                           artifacts=result.artifacts, seconds=seconds, modified_model=result.modified_model)

    def _evaluate(self, loaded: LoadedModel, ctx: Context, report: Report, when: str, reference=None):
        spec = self.evaluate
        windows = evaluation.heldout_windows(ctx.tokenizer, spec["data"], seq_len=spec["seq_len"],
                                             num_windows=spec["num_windows"],
                                             text_column=spec.get("text_column") or self.config.text_column)
        progress = None if ctx.quiet else lambda items, _: ctx.progress(items, f"perplexity {when}")
        if loaded.causal:
            result = evaluation.perplexity(loaded.model, windows, batch_size=spec["batch_size"], progress=progress)
            report.evaluation[when] = {"perplexity": result["perplexity"], "tokens": result["tokens"]}
            if spec["tasks"]:  # lm-eval on the model as it is now (factored, pruned, adapted), unmerged
                scores = task_scores(loaded.model, loaded.tokenizer, list(spec["tasks"]), batch_size=spec["batch_size"],
                                     manager=self._task_manager, quiet=ctx.quiet)
                report.evaluation[when].update(flat_scores(scores))
            return None
        if spec["tasks"]:
            raise ConfigError("`evaluate.tasks` scores causal LMs with lm-eval; this model is an encoder: drop `tasks`")
        embeddings = evaluation.pooled_embeddings(loaded.model, windows, spec["batch_size"])
        cosine = 1.0 if reference is None else evaluation.embedding_cosine(reference, embeddings)
        report.evaluation[when] = {"embedding_cosine_to_dense": cosine, "windows": int(windows.shape[0])}
        return embeddings

    def _write_model(self, loaded: LoadedModel, report: Report, tmp: Path) -> bool:
        """Write the checkpoint or the adapters the stages produced; True when a model was written."""
        dtype = output_dtype(self.config.dtype, loaded.source_dtype)
        adapters = [Path(r.artifacts["adapter"]) for r in report.stages
                    if str(r.artifacts.get("adapter", "")).endswith(".safetensors")]
        for adapter in adapters:  # adapters kept separate follow the checkpoint dtype too
            cast_safetensors_file(adapter, dtype)
        # An adapter kept separate leaves the model unmodified; top-level `merge` folds it in.
        merged_adapter = self.config.merge and any(r.kind == "finetune" for r in report.stages)
        if merged_adapter or any(r.modified_model for r in report.stages):
            gather_to_cpu(loaded.model)  # an offloaded model is written from CPU, whole
            if self.config.merge:
                from .layers import merge_compressed

                merge_compressed(loaded.model)
            save_checkpoint(loaded.model, loaded.tokenizer, tmp, _manifest(self, report), dtype)
            after = {**model_size(loaded.model, dtype), "disk_bytes": weight_file_bytes(tmp)}
            report.size = size_summary(report.size["before"], after, dtype)
            record_budgets(report)
            if self.config.export is not None:
                export_beside(tmp, self.config.export)
            return True
        if adapters:  # adapter-only output: its files are what the run adds on disk
            after = {"disk_bytes": sum(folder_bytes(a.parent) for a in adapters)}
            report.size = size_summary(report.size["before"], after, dtype)
        return bool(adapters)

    def _write_report(self, report: Report, tmp: Path) -> None:
        (tmp / "recipe.resolved.yaml").write_text(yaml.safe_dump(self.to_recipe(), sort_keys=False))
        write_report(report, tmp)

    def _resumes(self) -> list[Path]:
        return [resolved(r) for s in self.stages if (r := getattr(s.config, "resume", None))]

    def _raise_missed_gates(self, report: Report) -> None:
        """Gates are judged once, before anything is written (report.md shows the verdict)."""
        missed = [g for g in report.gates if not g["passed"]]
        if missed:
            raise GateError("; ".join(f"gate `{g['gate']}` missed: {g['value']:.4g} vs limit {g['limit']}"
                                      for g in missed) + " (outputs were written; loosen the gate or change the recipe)")


def _source_disk_bytes(source: str) -> int | None:
    """Bytes of the source's weight files when it is a local path (None for a Hub id)."""
    return weight_file_bytes(DEFAULT_MODEL_DIR if source == "default" else source)


# Fine-tuning stages that wrap plain linears (adapters._common.refuse_compressed refuses the rest).
WRAPS_PLAIN_LINEARS = ("lora", "nola", "dsee")


def refuse_adapter_on_compressed(stages: list[Stage], model: str | None) -> None:
    """Refuse, before anything loads, an adapter stage whose targets in the checkpoint `model`
    are compressed layers (read from its layer table), naming the stage that trains them."""
    if not stages or stages[0].name not in WRAPS_PLAIN_LINEARS or not model or not Path(model).is_dir():
        return
    manifest = read_manifest(model) or {}
    config = stages[0].config
    hit = [n for n in manifest.get("layers", {})
           if is_selected(n, tuple(config.targets or ()), tuple(getattr(config, "ignore", ()) or ()))]
    if hit:
        method = stages[0].name
        raise ConfigError(f"{method} wraps plain linears, and {len(hit)} of its targets in `{model}` are compressed "
                          f"layers (e.g. {hit[0]}); train the compressed layers themselves with `compressor "
                          f"finetune --method heal {model}`, or fine-tune the dense model with {method} before "
                          "compressing it")


def plan_steps(stages: list[Stage], evaluate: dict[str, Any] | None, blocks: int) -> list[str]:
    """The phases of a run, in order, with their sizes (the start-of-run line)."""
    scored = [f"perplexity before ({evaluate['num_windows']} windows)"] if evaluate else []
    steps = [stage_size(s, blocks) for s in stages]
    after = [f"perplexity after ({evaluate['num_windows']} windows)"] if evaluate else []
    return scored + steps + after


def stage_size(stage: Stage, blocks: int) -> str:
    fields = stage.fields
    if "steps" in fields:
        return f"{stage.name} ({fields['steps']} steps × {fields.get('batch_size', '?')} windows)"
    if calibrates(stage):
        return f"{stage.name} calibration ({blocks} blocks × {fields['num_windows']} windows)"
    return stage.name


def calibrates(stage: Stage) -> bool:
    """A compression stage that reads calibration windows (magnitude pruning is data-free)."""
    fields = stage.fields
    return stage.kind == "compress" and "num_windows" in fields and fields.get("score") != "magnitude"


def estimate_line(stages: list[Stage], evaluate: dict[str, Any], blocks: int, per_window: float) -> str:
    """A rough total from the timed "before" pass: a calibration replays each window about 3
    times (two phases and the propagated output), a training step costs ~3 forward passes of its
    batch (2 for MeZO); factorisation time (SVD, Cholesky) is not included."""
    seconds = 2 * per_window * evaluate["num_windows"]  # the two perplexity passes
    for stage in stages:
        fields = stage.fields
        tokens = fields.get("seq_len", evaluate["seq_len"]) / evaluate["seq_len"]
        if "steps" in fields:
            passes = 2 if fields.get("optimizer") == "mezo" or stage.name == "mezo" else 3
            seconds += passes * per_window * tokens * fields["steps"] * fields.get("batch_size", 1)
        elif calibrates(stage):
            seconds += 3 * per_window * tokens * fields["num_windows"]
    minutes = seconds / 60
    when = f"≈ {minutes:.0f} min" if minutes >= 1 else f"≈ {seconds:.0f} s"
    return (f"estimate: {when} on this machine for the forward passes ({per_window:.2g} s per window of "
            f"{evaluate['seq_len']} tokens measured; factorisation adds to it)")


def result_problems(loaded: LoadedModel, report: Report) -> list[str]:
    """Why a finished run's result must not be published: non-finite weights, losses or quality."""
    problems = []
    for record in report.stages:
        for key, value in record.metrics.items():
            judged = ("loss" in key or key.endswith("_after")) and not key.endswith("_before")
            if judged and isinstance(value, float) and not math.isfinite(value):
                problems.append(f"stage `{record.stage}` {key} is {value}")
    for key, value in report.evaluation.get("after", {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key} after the run is {value}")
    for record in report.stages:  # a byte budget (`target_bytes`) is met on disk, or nothing is published
        budget, disk = record.metrics.get("budget_bytes"), record.metrics.get("disk_bytes")
        if budget and disk and disk > budget:
            problems.append(f"stage `{record.stage}`: model.safetensors is {disk} bytes, over its `target_bytes` "
                            f"budget of {budget} (predicted {record.metrics.get('predicted_bytes')})")
    if any(r.modified_model for r in report.stages):
        bad = nonfinite_tensors(loaded.model)
        if bad:
            problems.append(f"{len(bad)} weight tensor(s) hold NaN/Inf (e.g. {bad[0]})")
    return problems


def record_budgets(report: Report) -> None:
    """The file's measured bytes beside each byte budget a stage planned (metric + report line)."""
    disk = report.size.get("after", {}).get("disk_bytes")
    for record in report.stages:
        if record.metrics.get("budget_bytes") and disk:
            record.metrics["disk_bytes"] = disk
            record.notes.append(f"bytes budget {record.metrics['budget_bytes']} vs on disk {disk} (predicted "
                                f"{record.metrics.get('predicted_bytes')}; {disk / record.metrics['dense_bf16_bytes']:.4f} "
                                "of the dense bf16 checkpoint)")


def secondary_rank() -> bool:
    """True in every process but rank 0 of a torchrun / accelerate launch job (both set RANK)."""
    return int(os.environ.get("RANK", "0") or 0) > 0


@contextlib.contextmanager
def scratch_dir(needed: bool):
    """A temporary folder deleted on exit when `needed`, else None."""
    if not needed:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="compressor-rank-") as tmp:
        yield Path(tmp)


def _manifest(pipeline: Pipeline, report: Report) -> dict[str, Any]:
    last = report.stages[-1]
    return {"method": " -> ".join(s.name for s in pipeline.stages), "stages": pipeline.to_recipe()["stages"],
            "source_model": report.run.get("model"), "keep_ratio": last.metrics.get("keep_ratio_reached"),
            "metrics": {r.stage: {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str))}
                        for r in report.stages},
            "versions": report.run.get("versions"), "merged": pipeline.config.merge}


def evaluate_gates(gates: dict[str, float], evaluation_results: dict[str, Any]) -> list[dict[str, Any]]:
    before = evaluation_results.get("before", {})
    after = evaluation_results.get("after", {})
    results = []
    for gate, limit in gates.items():
        if gate == "max_ppl":
            value = after.get("perplexity")
            passed = value is not None and value <= limit
        elif gate == "max_ppl_increase":
            value = after["perplexity"] / before["perplexity"] - 1.0 if "perplexity" in after else None
            passed = value is not None and value <= limit
        else:  # min_cosine
            value = after.get("embedding_cosine_to_dense")
            passed = value is not None and value >= limit
        if value is None:
            raise ConfigError(f"gate `{gate}` needs an evaluation it did not get (is `evaluate` off, or the model "
                              "the wrong kind for this gate?)")
        results.append({"gate": gate, "value": float(value), "limit": float(limit), "passed": bool(passed)})
    return results


def parse_stage(index: int, spec: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(spec, dict) or "method" not in spec:
        raise ConfigError(f"{where}: each stage must be a mapping with a `method:` key, got {spec!r}")
    fields = {k: v for k, v in spec.items() if k != "method"}
    try:
        method = get_method(str(spec["method"]))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Stage(method.name, method.config_cls.from_dict(fields, where=f"{where} ({method.name})"), method)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
