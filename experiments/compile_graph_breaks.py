"""Graph breaks of torch.compile inside each runtime method's patched forward (issue 15).

One denoiser call of ``model=tiny_sd15`` per method under ``torch._dynamo.explain``: how many
graphs dynamo makes and why it breaks them (``fullgraph=True`` needs 0). Writes
``experiments/results/compile_graph_breaks.md``.

    python experiments/compile_graph_breaks.py [--methods none,tome,at_edm,deepcache]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "compile_graph_breaks.md"


def explain(method: str):
    import torch._dynamo as dynamo

    from edm.configs import method as build
    from edm.methods.base import ApplyContext
    from edm.models.tiny import tiny_sd15

    pipe = tiny_sd15()
    gen = {"num_inference_steps": 2, "guidance_scale": 2.0, "height": 32, "width": 32,
           "batch_size": 2}
    build("model=tiny_sd15", f"method={method}").apply(pipe, ApplyContext(family="sd15", gen=gen))
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    dynamo.reset()
    out = dynamo.explain(unet)(x, torch.tensor(999), encoder_hidden_states=ctx)
    reasons = Counter(str(r.reason).strip().splitlines()[0][:110] for r in out.break_reasons)
    return out.graph_count, out.graph_break_count, reasons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="none,tome,at_edm,deepcache,taylorseer_cache,pab")
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = ["# Graph breaks under torch.compile (tiny_sd15, one UNet call, `torch._dynamo.explain`)",
             "", f"torch {torch.__version__}. Produced by `python experiments/compile_graph_breaks.py`.",
             "", "| method | graphs | graph breaks | reasons (count) |", "|---|---|---|---|"]
    for m in args.methods.split(","):
        graphs, breaks, reasons = explain(m)
        why = "; ".join(f"{r} ({n})" for r, n in reasons.most_common(4)) or "-"
        lines.append(f"| {m} | {graphs} | {breaks} | {why} |")
        print(lines[-1], flush=True)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
