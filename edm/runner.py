"""``run(cfg)``: plan (checks) -> load -> dense references (``eval=paired`` only) -> apply method
-> generate -> measure -> evaluate -> log.

Everything that can fail because of a config value or a missing file is checked in
:func:`plan_run`, before the pipeline is loaded, so a bad sweep point fails in seconds. Each later
step returns the metrics it measured; ``run`` only collects them. The function returns the
primary metric as a plain float (picklable for submitit, usable by sweepers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from edm import perf
from edm.data.images import MISSING, ImageSet, PromptItem
from edm.data.prompts import assign_seeds, shard
from edm.compiling import compile_forward
from edm.errors import ConfigError
from edm.eval.weights import preflight
from edm.generate import generate, time_batches
from edm.io import write_json, write_text
from edm.methods.base import ApplyContext, Method, MethodReport
from edm.records import (
    generation_protocol,
    provenance,
    requested_sparsity,
    sparsity_was_set,
    tracker_config,
)
from edm.validate import resolve_device, resolve_dtype, validate

log = logging.getLogger(__name__)


def setup_backends(cfg: DictConfig) -> None:
    """Global torch settings live here and nowhere else (no import-time side effects)."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))


def build_method(cfg: DictConfig) -> Method:
    """``cfg.method``, or a ``Sequential`` of it and ``cfg.then`` (``then=at_edm``)."""
    from edm.methods.compose import build_method as build

    return build(cfg)


def build_evaluators(cfg: DictConfig) -> tuple[dict, list[str]]:
    """Instantiate every ``_target_`` node of ``cfg.eval`` and run their pre-flight checks."""
    evaluators = {
        k: instantiate(v) for k, v in cfg.eval.items()
        if isinstance(v, DictConfig) and v.get("_target_")
    }
    return preflight(evaluators, bool(cfg.eval.get("skip_unavailable", False)))


@dataclass
class Plan:
    """Everything a run needs, built and checked before any model is loaded."""

    cfg: DictConfig
    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    method: Method
    loader: Any
    calib: Any
    evaluators: dict
    skipped_evaluators: list[str]
    all_items: list[PromptItem]  # the whole prompt set (evaluation)
    items: list[PromptItem]  # this job's shard of it (generation)
    gen: dict
    logger: Any
    requested_sparsity: float | None
    references: tuple[Path, dict, dict] | None = None  # paired: folder, key spec, dense gen

    @property
    def images_dir(self) -> Path:
        return Path(self.gen["images_dir"])


def plan_run(cfg: DictConfig) -> Plan:
    """Step 1: validate, instantiate and pre-flight everything; nothing heavy is loaded."""
    validate(cfg)
    setup_backends(cfg)
    device = resolve_device(cfg.device)
    log.info("Instantiating method <method=%s>", cfg.method.name)
    method = build_method(cfg)
    method.check(cfg.model.family)
    method.check_device(device, resolve_dtype(cfg.model.dtype, device))
    compile_cfg = cfg.get("compile")
    if compile_cfg and compile_cfg.enabled and compile_cfg.fullgraph and method.compile_blockers():
        raise ConfigError("compile.fullgraph", "; ".join(method.compile_blockers()) + ".",
                          [False])
    loader = instantiate(cfg.model.loader)
    loader.check()
    if getattr(method, "needs_train_data", False) and hasattr(loader, "check_train_data"):
        loader.check_train_data()  # e.g. CIFAR-10 for Diff-Pruning on model=ddpm_cifar10
    data = instantiate(cfg.data)
    data.check()
    calib = instantiate(cfg.calib) if cfg.calib.get("_target_") else None
    if calib is not None and method.kind in ("weights", "compose") and \
            getattr(method, "needs_calib", True):
        calib.check()
    evaluators, skipped = build_evaluators(cfg)
    all_items = assign_seeds(data.load(), int(cfg.seed))
    references = plan_references(cfg, evaluators, all_items, device, method)
    requested = requested_sparsity(cfg)
    if requested is None and sparsity_was_set(cfg):
        log.warning("<sparsity=%s> is not used by method=%s (a runtime method: its ratio is a "
                    "method.* knob); metrics record the ratio it measured instead",
                    cfg.sparsity, cfg.method.name)
    return Plan(
        cfg=cfg, out_dir=Path(cfg.paths.output_dir), device=device,
        dtype=resolve_dtype(cfg.model.dtype, device), method=method, loader=loader, calib=calib,
        evaluators=evaluators, skipped_evaluators=skipped, all_items=all_items,
        items=shard(all_items, int(cfg.gen.shard), int(cfg.gen.num_shards)),
        gen=OmegaConf.to_container(cfg.gen, resolve=True),
        logger=instantiate(cfg.logger) if cfg.logger.get("_target_") else None,
        requested_sparsity=requested, references=references,
    )


def plan_references(cfg: DictConfig, evaluators: dict, items: list[PromptItem],
                    device: torch.device, method: Method) -> tuple[Path, dict, dict] | None:
    """Where the dense references of paired evaluators are (``edm.eval.dense_ref``), checked:
    a run that cannot make missing ones (generation off, ``make_reference: false``, or a
    pruned model loaded with ``model.pruned_from``) fails here, before anything loads."""
    paired = [(n, e) for n, e in evaluators.items() if getattr(e, "needs_dense_reference", False)]
    if not paired:
        return None
    from edm.eval.dense_ref import reference_dir

    name, ev = paired[0]
    gen = method.reference_gen(OmegaConf.to_container(cfg.gen, resolve=True))
    folder, spec = reference_dir(cfg, items, device, ev.root, gen)
    for _, e in paired:
        e.reference_dir = folder
    can_make = cfg.gen.enabled and ev.make_reference and not cfg.model.get("pruned_from")
    if not can_make:
        missing = ImageSet(folder, items, size=(gen["width"], gen["height"])).missing()
        if missing:
            why = ("gen.enabled=false" if not cfg.gen.enabled else
                   "model.pruned_from loads a pruned model" if cfg.model.get("pruned_from") else
                   f"eval.{name}.make_reference=false")
            raise ConfigError(f"eval.{name}.make_reference", f"{len(missing)} of {len(items)} "
                              f"dense reference images are missing in {folder} and this run "
                              f"cannot make them ({why}); run the same model, data and gen "
                              "settings once with generation on and no pruned_from.", [True])
    return folder, spec, gen


def make_references(plan: Plan, pipe) -> dict[str, float]:
    """Step 2b: this shard's missing dense references, from the still-dense pipeline."""
    if plan.references is None or not plan.evaluators:
        return {}
    from edm.eval.dense_ref import make_references as make

    folder, spec, gen = plan.references
    made = make(pipe, plan.items, gen, folder, spec, plan.device)
    return {"perf/dense_refs_generated": float(made)}


def load_pipeline(plan: Plan):
    """Step 2: the pipeline (plus a saved structured pruning to re-apply, ``model.pruned_from``)."""
    cfg = plan.cfg
    log.info("Loading <model=%s> (%s, %s, %s)", cfg.model.name, cfg.model.family, plan.dtype,
             plan.device)
    pipe = plan.loader.load(family=cfg.model.family, dtype=plan.dtype, device=plan.device)
    if cfg.model.get("pruned_from"):
        from edm.methods.weight.io import apply_pruned_from

        apply_pruned_from(pipe, cfg.model.pruned_from)
    return pipe


def apply_method(plan: Plan, pipe) -> tuple[MethodReport, dict[str, float]]:
    """Step 3: apply the method; its report goes to ``method_report.json``."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    dense = perf.param_stats(denoiser)
    ctx = ApplyContext(family=plan.cfg.model.family, device=plan.device, dtype=plan.dtype,
                       seed=int(plan.cfg.seed), output_dir=plan.out_dir, gen=plan.gen,
                       calib=plan.calib, train_data=getattr(plan.loader, "train_data", None))
    perf.reset_peak_memory(plan.device)
    t0 = time.perf_counter()
    report = plan.method.apply(pipe, ctx)
    metrics = {"method/apply_seconds": time.perf_counter() - t0, **report.scalars()}
    write_json(plan.out_dir / "method_report.json", {
        "name": report.name, "kind": report.kind, "patched": report.patched,
        "sparsity": report.sparsity, "metrics": report.metrics, "details": report.details})
    metrics.update({f"perf/{k}": v for k, v in perf.param_stats(denoiser).items()})
    metrics["perf/dense_params_m"] = dense["params_m"]
    return report, metrics


def compile_denoiser(plan: Plan, pipe) -> dict[str, float]:
    """Step 3b (``compile.enabled``): ``torch.compile`` the denoiser's ``forward`` in place,
    after the method, so the method's layer hooks and processors are compiled with it.

    Only ``forward`` is compiled, not ``nn.Module.__call__``: the forward pre-hooks on the
    denoiser itself (:class:`edm.state.StepTracker` and the methods' per-call planning: DSAP
    ratios, ToMe's random destinations, CFG detection) stay eager Python. They read the timestep
    value and draw from generators -- graph breaks if traced -- and the traced layers then see
    only per-call decisions that take a few values (a handful of graphs per trajectory, not one
    per step). The module object is kept, so the pipeline and the method's ``remove`` still see
    it; compilation happens on the first call, i.e. in the untimed warm-up batch."""
    c = plan.cfg.get("compile")
    if not c or not c.enabled:
        return {}
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    log.info("Compiling the denoiser <compile.mode=%s fullgraph=%s>", c.mode, c.fullgraph)
    freezing = c.get("freezing")
    if freezing is None:
        freezing = plan.device.type == "cpu"
    compile_forward(denoiser, mode=c.mode, fullgraph=bool(c.fullgraph), dynamic=c.dynamic,
                    freezing=bool(freezing))
    return {"perf/compiled": 1.0, "perf/compile_freezing": float(bool(freezing))}


def generate_images(plan: Plan, pipe) -> dict[str, float]:
    """Step 4: this shard's images (resumable; damaged files repaired) and their latency."""
    gen = plan.gen
    name = ("prompts.jsonl" if gen["num_shards"] == 1 else
            f"prompts.shard{gen['shard']:03d}-of-{gen['num_shards']:03d}.jsonl")
    write_text(plan.out_dir / name, "".join(it.to_json() + "\n" for it in plan.items))
    stats = generate(pipe, plan.items, gen, plan.images_dir, plan.device, warmup=gen["warmup"],
                     progress=gen["progress"])
    if stats.timed_images == 0 and plan.cfg.perf.latency_batches > 0:  # all on disk already
        timed = time_batches(pipe, plan.items, gen, plan.device, int(plan.cfg.perf.latency_batches))
        stats.timed_images, stats.timed_seconds = timed.timed_images, timed.timed_seconds
    metrics = {"perf/images_generated": float(stats.generated),
               "perf/images_repaired": float(stats.repaired)}  # damaged files regenerated
    if stats.sec_per_image is not None:
        metrics["perf/sec_per_image"] = stats.sec_per_image
    return metrics


def measure(plan: Plan, pipe) -> dict[str, float]:
    """Step 5: what the method measured while generating, peak memory, FLOPs per step."""
    # Read before FLOPs counting: its meta-device calls are not generation.
    metrics = {f"method/{k}": float(v) for k, v in plan.method.run_metrics().items()}
    metrics.update({f"perf/{k}": v for k, v in perf.peak_memory_gb(plan.device).items()})
    if plan.cfg.perf.flops and plan.items:
        # a compiled denoiser runs inductor kernels the flop counter cannot see: count in eager
        with torch.compiler.set_stance("force_eager"):
            flops = perf.flops_per_step(pipe, plan.items[0], plan.gen,
                                        guidance=plan.cfg.model.limits.guidance)
        metrics.update({f"perf/{k}": v for k, v in flops.items()})
    return metrics


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    inputs_hash: str | None = None
    missing: list[int] = field(default_factory=list)  # absent or damaged images


def _inputs_hash(cfg: DictConfig, images: ImageSet) -> str:
    """Identifies evaluation inputs: the eval config and every image's name, size and mtime."""
    h = hashlib.sha256(OmegaConf.to_yaml(cfg.eval, resolve=True).encode())
    for p in images.paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _run_evaluators(plan: Plan, images: ImageSet) -> Evaluation:
    """Every evaluator on ``images``, or the previous metrics.json's results if its inputs are
    unchanged (a resumed run does not recompute FID)."""
    key = _inputs_hash(plan.cfg, images)
    prev = plan.out_dir / "metrics.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        if old.get("run", {}).get("eval_inputs_hash") == key:
            log.info("Evaluation inputs unchanged (%s); reusing metrics", key)
            ev = {k: v for k, v in old["metrics"].items() if k.startswith("eval/")}
            return Evaluation(ev, old.get("per_image", {}), key)
    out = Evaluation(inputs_hash=key)
    for name, ev in plan.evaluators.items():
        log.info("Evaluating <eval.%s> on %d images", name, len(images))
        for k, v in ev.evaluate(images).items():
            if isinstance(v, (list, tuple)):
                out.per_image[k] = list(v)
            else:
                out.metrics[f"eval/{k}"] = float(v)
    return out


def evaluate_images(plan: Plan) -> Evaluation:
    """Step 6: evaluate once every image of the (unsharded) prompt set exists and is valid."""
    gen = plan.gen
    full = ImageSet(plan.images_dir, plan.all_items, size=(gen["width"], gen["height"]))
    if gen["enabled"] and gen["num_shards"] > 1:  # the eval-only job evaluates the union once
        # existence only: decoding the other shards' images is the eval job's work
        log.info("Shard %d/%d done; evaluate with gen.enabled=false once all shards finished",
                 gen["shard"], gen["num_shards"])
        return Evaluation(missing=[it.index for it, p in zip(plan.all_items, full.paths)
                                   if not p.exists()])
    problems = full.problems()  # absent or damaged: evaluation never reads those
    damaged = {i: r for i, r in problems.items() if r != MISSING}
    if damaged:
        shown = "; ".join(f"{i:06d}: {r}" for i, r in list(damaged.items())[:20])
        log.warning("%d damaged images in %s (rerun generation to repair): %s",
                    len(damaged), plan.images_dir, shown)
    if plan.evaluators and problems:
        log.info("Not evaluating: %d of %d images missing or damaged (other shards still "
                 "running?)", len(problems), len(full))
    if not plan.evaluators or problems:
        return Evaluation(missing=sorted(problems))
    return _run_evaluators(plan, full)


def summary(plan: Plan, report: MethodReport | None, metrics: dict, ev: Evaluation,
            protocol: dict) -> dict:
    """Step 7: the ``metrics.json`` record."""
    cfg, gen = plan.cfg, plan.gen
    details = report.details if report and isinstance(report.details, dict) else {}
    return {
        "metrics": metrics,
        "per_image": ev.per_image,
        "run": {
            "run_name": cfg.run_name, "model": cfg.model.name, "family": cfg.model.family,
            "method": report.name if report else cfg.method.name,
            "kind": report.kind if report else None, "tag": cfg.method.get("tag"),
            "requested_sparsity": plan.requested_sparsity, "protocol": protocol,
            "seed": int(cfg.seed), "output_dir": str(plan.out_dir),
            "images_dir": str(plan.images_dir), "num_items": len(plan.all_items),
            "shard": gen["shard"], "num_shards": gen["num_shards"],
            "eval_inputs_hash": ev.inputs_hash, "skipped_evaluators": plan.skipped_evaluators,
            "missing_images": len(ev.missing),
            "eval_meta": {n: dict(getattr(e, "meta", None) or {})  # e.g. FID mode, reference
                          for n, e in plan.evaluators.items()},
            "prune_point": details.get("prune_point"),
            **provenance(cfg),
        },
    }


def run(cfg: DictConfig) -> float:
    t_start = time.perf_counter()
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    plan = plan_run(cfg)
    metrics: dict[str, float] = {}
    if plan.requested_sparsity is not None:
        metrics["method/requested_sparsity"] = plan.requested_sparsity
    protocol = generation_protocol(cfg)  # the loaded pipeline's sampler replaces the configured one
    report = None
    try:
        if plan.logger is not None:
            plan.logger.start(tracker_config(cfg), plan.out_dir, job_type=plan.method.kind)
        if plan.gen["enabled"]:
            pipe = load_pipeline(plan)
            protocol = generation_protocol(cfg, pipe)
            metrics.update(make_references(plan, pipe))
            report, applied = apply_method(plan, pipe)
            metrics.update(applied)
            metrics.update(compile_denoiser(plan, pipe))
            metrics.update(generate_images(plan, pipe))
            metrics.update(measure(plan, pipe))
        else:
            log.info("Evaluation only <gen.enabled=false>: images from %s", plan.images_dir)
        ev = evaluate_images(plan)
        metrics.update(ev.metrics)
        metrics["perf/run_seconds"] = time.perf_counter() - t_start
        write_json(plan.out_dir / "metrics.json", summary(plan, report, metrics, ev, protocol))
        if plan.logger is not None:
            plan.logger.log(metrics)
            if not ev.missing:
                plan.logger.log_images(plan.images_dir, plan.all_items, ev.per_image)
        log.info("Metrics: %s", json.dumps(metrics, indent=1, sort_keys=True))
    finally:
        if plan.logger is not None:
            plan.logger.finish()
        log.info("Output dir: %s", plan.out_dir)

    primary = cfg.eval.get("primary_metric", "perf/sec_per_image")
    return float(metrics.get(primary, math.nan))
