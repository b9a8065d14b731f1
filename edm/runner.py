"""``run(cfg)``: seed -> checks -> load pipeline -> apply method -> generate -> evaluate -> log.

Everything that can fail because of a config value or a missing file is checked before the
pipeline is loaded, so a bad sweep point fails in seconds. The function returns the primary
metric as a plain float (picklable for submitit, usable by sweepers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from edm import perf
from edm.data.images import MISSING, ImageSet
from edm.data.prompts import assign_seeds, shard
from edm.eval.weights import preflight
from edm.generate import generate, time_batches
from edm.io import write_json, write_text
from edm.methods.base import ApplyContext, Method, MethodReport
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


def _inputs_hash(cfg: DictConfig, images: ImageSet) -> str:
    """Identifies evaluation inputs: the eval config and every image's name, size and mtime."""
    h = hashlib.sha256(OmegaConf.to_yaml(cfg.eval, resolve=True).encode())
    for p in images.paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _eval_meta(evaluators) -> dict:
    """Protocol facts evaluators expose (e.g. FID mode and reference stats file)."""
    return {n: dict(getattr(ev, "meta", None) or {}) for n, ev in evaluators.items()}


def _evaluate(cfg, evaluators, images: ImageSet, out_dir: Path) -> tuple[dict, dict, str]:
    key = _inputs_hash(cfg, images)
    prev = out_dir / "metrics.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        if old.get("run", {}).get("eval_inputs_hash") == key:
            log.info("Evaluation inputs unchanged (%s); reusing metrics", key)
            ev = {k: v for k, v in old["metrics"].items() if k.startswith("eval/")}
            return ev, old.get("per_image", {}), key
    metrics, per_image = {}, {}
    for name, ev in evaluators.items():
        log.info("Evaluating <eval.%s> on %d images", name, len(images))
        for k, v in ev.evaluate(images).items():
            if isinstance(v, (list, tuple)):
                per_image[k] = list(v)
            else:
                metrics[f"eval/{k}"] = float(v)
    return metrics, per_image, key


PROVENANCE_KEYS = ("model", "method", "gen", "sparsity", "seed")


def _flat(node, prefix="") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def flat_config(resolved: dict) -> dict:
    """The config values tables match runs on (``run.config`` of metrics.json and of W&B
    records alike): model/method/gen/sparsity/seed flattened to dotted keys, without loader
    paths and ``_target_`` class names."""
    flat = _flat({k: resolved[k] for k in PROVENANCE_KEYS if k in resolved})
    return {k: v for k, v in flat.items() if not k.startswith("model.loader") and "_target_" not in k}


def generation_protocol(cfg: DictConfig, pipe=None) -> dict:
    """How the images were made, for tables that compare with a paper's protocol: steps, CFG,
    size and the sampler actually installed (the loaded pipeline's, else the configured one)."""
    sched = type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else \
        cfg.model.loader.get("scheduler")
    choice = None
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("protocol")
    except ValueError:
        pass
    return {"name": choice, "num_inference_steps": int(cfg.gen.num_inference_steps),
            "guidance_scale": float(cfg.gen.guidance_scale), "height": int(cfg.gen.height),
            "width": int(cfg.gen.width), "scheduler": sched}


def requested_sparsity(cfg: DictConfig) -> float | None:
    """The global ``sparsity`` if the composed method uses it (``${sparsity}`` in its config),
    else ``None``: token methods have their own ratio knobs and ignore it."""
    nodes = [cfg.method] + ([cfg.then] if cfg.get("then") else [])
    text = "".join(OmegaConf.to_yaml(n, resolve=False) for n in nodes)
    return float(cfg.sparsity) if "${sparsity}" in text else None


def _provenance(cfg: DictConfig) -> dict:
    """Group choices and CLI overrides (for tables that match results to paper rows)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
        overrides = list(hc.overrides.task)
    except ValueError:  # run() called without Hydra (tests, notebooks)
        choices, overrides = {}, []
    return {"choices": choices, "overrides": overrides,
            "config": flat_config(OmegaConf.to_container(cfg, resolve=True))}


def tracker_config(cfg: DictConfig) -> dict:
    """The config a tracker run gets: the resolved config plus ``provenance`` (group choices and
    CLI overrides), which the config alone lacks (``method=tome_c`` resolves to
    ``method.name=tome``) and experiments/tables.py needs to match W&B runs to paper rows."""
    prov = _provenance(cfg)
    return {**OmegaConf.to_container(cfg, resolve=True),
            "provenance": {k: prov[k] for k in ("choices", "overrides")}}


def _load_apply_generate(cfg, method, loader, items, gen, images_dir, device, dtype, calib,
                         out_dir, metrics, protocol) -> MethodReport:
    """Steps 2-3 of the run: load, apply the method, generate; fills ``metrics`` in place."""
    family = cfg.model.family
    # 2. Load the pipeline and apply the method.
    log.info("Loading <model=%s> (%s, %s, %s)", cfg.model.name, family, dtype, device)
    pipe = loader.load(family=family, dtype=dtype, device=device)
    protocol.update(generation_protocol(cfg, pipe))
    if cfg.model.get("pruned_from"):
        from edm.methods.weight.io import apply_pruned_from

        apply_pruned_from(pipe, cfg.model.pruned_from)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    dense = perf.param_stats(denoiser)
    ctx = ApplyContext(family=family, device=device, dtype=dtype, seed=int(cfg.seed),
                       output_dir=out_dir, gen=gen, calib=calib,
                       train_data=getattr(loader, "train_data", None))
    perf.reset_peak_memory(device)
    t0 = time.perf_counter()
    report = method.apply(pipe, ctx)
    metrics["method/apply_seconds"] = time.perf_counter() - t0
    metrics.update(report.scalars())
    write_json(out_dir / "method_report.json", {
        "name": report.name, "kind": report.kind, "patched": report.patched,
        "sparsity": report.sparsity, "metrics": report.metrics, "details": report.details})
    pruned = perf.param_stats(denoiser)
    metrics.update({f"perf/{k}": v for k, v in pruned.items()})
    metrics["perf/dense_params_m"] = dense["params_m"]

    # 3. Generate (resumable, sharded).
    write_text(out_dir / ("prompts.jsonl" if gen["num_shards"] == 1 else
                          f"prompts.shard{gen['shard']:03d}-of-{gen['num_shards']:03d}.jsonl"),
               "".join(it.to_json() + "\n" for it in items))
    stats = generate(pipe, items, gen, images_dir, device, warmup=gen["warmup"],
                     progress=gen["progress"])
    if stats.timed_images == 0 and cfg.perf.latency_batches > 0:
        timed = time_batches(pipe, items, gen, device, int(cfg.perf.latency_batches))
        stats.timed_images, stats.timed_seconds = timed.timed_images, timed.timed_seconds
    if stats.sec_per_image is not None:
        metrics["perf/sec_per_image"] = stats.sec_per_image
    metrics["perf/images_generated"] = float(stats.generated)
    metrics["perf/images_repaired"] = float(stats.repaired)  # damaged files regenerated
    # Read before FLOPs counting: its meta-device calls are not generation.
    metrics.update({f"method/{k}": float(v) for k, v in method.run_metrics().items()})
    metrics.update({f"perf/{k}": v for k, v in perf.peak_memory_gb(device).items()})
    if cfg.perf.flops and items:
        try:
            metrics.update({f"perf/{k}": v for k, v in perf.flops_per_step(pipe, items[0], gen).items()})
        except ImportError as e:  # pragma: no cover - flops module missing
            log.warning("FLOPs not measured: %s", e)

    return report


def run(cfg: DictConfig) -> float:
    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Checks before any model is loaded.
    validate(cfg)
    setup_backends(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    family = cfg.model.family
    log.info("Instantiating method <method=%s>", cfg.method.name)
    method = build_method(cfg)
    method.check(family)
    loader = instantiate(cfg.model.loader)
    loader.check()
    data = instantiate(cfg.data)
    data.check()
    calib = instantiate(cfg.calib) if cfg.calib.get("_target_") else None
    if calib is not None and method.kind in ("weights", "compose") and getattr(method, "needs_calib", True):
        calib.check()
    evaluators, skipped = build_evaluators(cfg)
    all_items = assign_seeds(data.load(), int(cfg.seed))
    items = shard(all_items, int(cfg.gen.shard), int(cfg.gen.num_shards))
    gen = OmegaConf.to_container(cfg.gen, resolve=True)
    images_dir = Path(gen["images_dir"])
    logger = instantiate(cfg.logger) if cfg.logger.get("_target_") else None

    requested = requested_sparsity(cfg)
    if requested is None and any(o.split("=")[0] == "sparsity" for o in _provenance(cfg)["overrides"]):
        log.warning("<sparsity=%s> is not used by method=%s (a runtime method: its ratio is a "
                    "method.* knob); metrics record the ratio it measured instead",
                    cfg.sparsity, cfg.method.name)
    metrics: dict[str, float] = {}
    protocol = generation_protocol(cfg)  # the loaded pipeline's sampler replaces the configured one
    if requested is not None:
        metrics["method/requested_sparsity"] = requested
    try:
        if logger is not None:
            logger.start(tracker_config(cfg), out_dir, job_type=method.kind)

        report = None
        if gen["enabled"]:
            report = _load_apply_generate(cfg, method, loader, items, gen, images_dir, device,
                                          dtype, calib, out_dir, metrics, protocol)
        else:
            log.info("Evaluation only <gen.enabled=false>: images from %s", images_dir)

        # 4. Evaluate once every image of the (unsharded) prompt set exists.
        full = ImageSet(images_dir, all_items, size=(gen["width"], gen["height"]))
        per_image: dict = {}
        eval_hash = None
        sharded_job = gen["enabled"] and gen["num_shards"] > 1
        if sharded_job:  # the eval-only job (gen.enabled=false) evaluates the union once
            # existence only: decoding the other shards' images is the eval job's work
            missing = [it.index for it, p in zip(all_items, full.paths) if not p.exists()]
            log.info("Shard %d/%d done; evaluate with gen.enabled=false once all shards finished",
                     gen["shard"], gen["num_shards"])
        else:
            problems = full.problems()  # absent or damaged: evaluation never reads those
            missing = sorted(problems)
            damaged = {i: r for i, r in problems.items() if r != MISSING}
            if damaged:
                shown = "; ".join(f"{i:06d}: {r}" for i, r in list(damaged.items())[:20])
                log.warning("%d damaged images in %s (rerun generation to repair): %s",
                            len(damaged), images_dir, shown)
            if evaluators and not missing:
                ev, per_image, eval_hash = _evaluate(cfg, evaluators, full, out_dir)
                metrics.update(ev)
            elif evaluators:
                log.info("Not evaluating: %d of %d images missing or damaged (other shards "
                         "still running?)", len(missing), len(full))
        metrics["perf/run_seconds"] = time.perf_counter() - t_start

        # 5. Log.
        summary = {
            "metrics": metrics,
            "per_image": per_image,
            "run": {
                "run_name": cfg.run_name, "model": cfg.model.name, "family": family,
                "method": report.name if report else cfg.method.name,
                "kind": report.kind if report else None, "tag": cfg.method.get("tag"),
                "requested_sparsity": requested, "protocol": protocol, "seed": int(cfg.seed),
                "output_dir": str(out_dir),
                "images_dir": str(images_dir), "num_items": len(all_items),
                "shard": gen["shard"], "num_shards": gen["num_shards"],
                "eval_inputs_hash": eval_hash, "skipped_evaluators": skipped,
                "missing_images": len(missing), "eval_meta": _eval_meta(evaluators),
                "prune_point": (report.details.get("prune_point")
                                if report and isinstance(report.details, dict) else None),
                **_provenance(cfg),
            },
        }
        write_json(out_dir / "metrics.json", summary)
        if logger is not None:
            logger.log(metrics)
            if not missing:
                logger.log_images(images_dir, all_items, per_image)
        log.info("Metrics: %s", json.dumps(metrics, indent=1, sort_keys=True))
    finally:
        if logger is not None:
            logger.finish()
        log.info("Output dir: %s", out_dir)

    primary = cfg.eval.get("primary_metric", "perf/sec_per_image")
    return float(metrics.get(primary, math.nan))
