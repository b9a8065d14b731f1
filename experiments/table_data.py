"""Run records and how they map onto a paper table's rows (shared by every table shape).

A record is a ``metrics.json`` as the runner writes it (or a W&B run made to look like one):
``metrics`` (flat scalars) and ``run`` (group ``choices``, CLI ``overrides``, the flattened
``config``, the generation ``protocol``). A table row's ``match`` names config values or group
choices; only runs of the table's own experiment fill it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edm.records import flat_config


def load_results(root: Path) -> list[dict]:
    """Every run record below ``root``, newest last: ``metrics.json`` files and the copies
    ``--collect`` commits (any ``*.json`` holding both ``metrics`` and ``run``; a run folder's
    ``method_report.json`` has no ``run``)."""
    out = []
    for p in sorted(Path(root).rglob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and "metrics" in rec and "run" in rec:
            rec["_path"] = str(p)
            out.append(rec)
    return out


def metric_value(metrics: dict, key):
    """A run's value of one table metric: ``key`` is a metrics.json key or ``{key, scale}``."""
    if isinstance(key, dict):
        v = metrics.get(key["key"])
        return None if v is None else v * float(key.get("scale", 1.0))
    return metrics.get(key)


def paper_metrics(spec: dict) -> set[str]:
    """Metrics for which at least one row has a paper number (the others: "ours" only)."""
    out: set[str] = set()
    for row in spec["rows"]:
        for k, v in (row.get("paper") or {}).items():
            out |= set(v) if isinstance(v, dict) else {k}  # pairs: {dense: {...}, pruned: {...}}
    return out


def wandb_record(run) -> dict:
    """A W&B run (``.config``, ``.summary``, ``.url``) as a metrics.json-shaped record.

    The runner logs the resolved config as nested dicts plus ``provenance`` (Hydra group choices
    and CLI overrides, which the config alone lacks: ``method=tome_c`` resolves to
    ``method.name=tome``); the summary holds the flat ``eval/...`` scalars. The record's
    ``run.config`` is flattened by ``edm.records.flat_config`` (as metrics.json) so ``value_of`` reads both alike.
    Runs logged without ``provenance`` fall back to ``experiment_name`` and ``method.name``.
    """
    cfg = dict(run.config)
    flat = flat_config(cfg)
    prov = cfg.get("provenance") or {}
    choices = prov.get("choices") or {"experiment": cfg.get("experiment_name"),
                                      "method": (cfg.get("method") or {}).get("name")}
    metrics = {k: v for k, v in run.summary.items()  # drops _runtime/_step and the images table
               if not k.startswith("_") and type(v) in (int, float)}
    return {"metrics": metrics, "_path": run.url,
            "run": {"choices": dict(choices), "overrides": list(prov.get("overrides") or []),
                    "config": flat}}


def load_wandb(path: str, api=None) -> list[dict]:
    """Records for every run of the W&B project ``entity/project`` (``api`` defaults to
    ``wandb.Api()``; tests pass a fake)."""
    if api is None:  # pragma: no cover - needs network and a W&B account
        import wandb

        api = wandb.Api()
    return [wandb_record(r) for r in api.runs(path)]


def same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def value_of(rec: dict, key: str):
    """A run's value for ``key``: CLI override, then group choice, then resolved config."""
    run = rec.get("run", {})
    for ov in run.get("overrides", []):
        k, _, v = ov.lstrip("+~").partition("=")
        if k == key:
            return v
    if key in run.get("choices", {}):
        return run["choices"][key]
    return run.get("config", {}).get(key, run.get(key))


def matches(rec: dict, match: dict, experiment: str | None = None) -> bool:
    # A table's rows differ only in method/sparsity, so a run from another experiment (or an ad-hoc
    # run of another model) must not fill them.
    if experiment and rec.get("run", {}).get("choices", {}).get("experiment") != experiment:
        return False
    return all(same(value_of(rec, k), v) for k, v in match.items())


def fmt(v) -> str:
    if v is None:
        return "not run"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def row_records(spec: dict, results: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each paper row with the newest run matching it (None: not run)."""
    out = []
    for row in spec["rows"]:
        hits = [r for r in results if matches(r, row["match"], spec.get("experiment"))]
        out.append((row, hits[-1] if hits else None))
    return out


def protocol_text(p: dict | None) -> str:
    if not p:
        return "not recorded (run made before metrics.json recorded it)"
    sched = p.get("scheduler") or "model default"
    return (f"{p['num_inference_steps']} steps, CFG {p['guidance_scale']:g}, "
            f"{p['height']}x{p['width']}, {sched}")


def protocol_lines(spec: dict, pairs: list[tuple[dict, dict | None]]) -> list[str]:
    """The paper's generation protocol and the one(s) our rows were generated with."""
    ours: dict[str, list[str]] = {}
    for row, rec in pairs:
        if rec is not None:
            ours.setdefault(protocol_text(rec.get("run", {}).get("protocol")), []).append(row["label"])
    lines = [f"Generation protocol: paper {spec.get('protocol', 'not stated')}; "]
    if not ours:
        lines[0] += "ours: no rows run yet."
    elif len(ours) == 1:
        lines[0] += f"ours {next(iter(ours))} (every row)."
    else:
        lines[0] += "**ours differ between rows**:"
        lines += [f"- {text}: {', '.join(labels)}" for text, labels in ours.items()]
    return lines


def footer(name: str, spec: dict, ran: int, total: int, pairs, image: str | None,
           unit: str = "rows") -> list[str]:
    """Rows run, the reproduce command, the protocols, the notes and the plot link."""
    lines = ["", (f"{ran}/{total} {unit} have results. Reproduce: "
                  f"`python run.py experiment={spec.get('experiment', name)}`."), ""]
    lines += protocol_lines(spec, pairs)
    if spec.get("notes"):
        lines += [""] + [str(n) for n in spec["notes"]]
    if image:
        lines += ["", f"![{name}: paper dashed/hollow, ours solid/filled]({image})"]
    return lines
