"""torch.compile with edm's runtime methods (issue 15): no graph break inside the patched
forward (``fullgraph=True``), a bounded number of graphs over DSAP trajectories, outputs equal to
eager.

``compile_forward`` compiles the denoiser's ``forward`` only, so the denoiser-level pre-hooks
(step tracking, the methods' per-call planning) stay eager; everything the methods patch *inside*
the forward is traced. Graphs are counted with a backend of our own that records each graph
dynamo hands it (a recompile is one more graph) and runs it as traced -- so outputs must equal
eager exactly. The inductor check (CPU here) is in test_compile.py and, for the methods, below
(slow marker).
"""

from __future__ import annotations

import copy

import pytest
import torch

from edm.configs import method as build
from edm.methods.base import ApplyContext
from edm.compiling import GraphCounter, compile_forward

STEPS = 6  # DSAP early_steps 0.1 -> 1 early step (AT-EDM), 0.2 -> 2 (ToMe): both ratios occur




def _generate(pipe, family, steps=STEPS, seeds=(0, 1)):
    size = 16 if family == "digits" else 32
    with torch.no_grad():
        return pipe(prompt=["a cat", "a dog"], num_inference_steps=steps, guidance_scale=3.0,
                    height=size, width=size, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def _apply(pipe, family, method, *overrides):
    m = build(f"method={method}", *overrides)
    m.apply(pipe, ApplyContext(family=family))
    return m


SLOW = pytest.mark.slow  # ~20-40 s each (dynamo traces every graph); one per method by default
CASES = [  # (family, method, overrides); DSAP on where the method has it
    ("sd15", "at_edm", ()),
    pytest.param("sd15", "at_edm", ("method.assignment=cosine",), marks=SLOW),
    pytest.param("sdxl", "at_edm", (), marks=SLOW),
    ("sd3", "at_edm", ()),
    # random scores drawn by the denoiser's eager pre-hook: no generator inside the graph
    ("sd15", "at_edm", ("method.selection=random",)),
    pytest.param("sd3", "at_edm", ("method.selection=random",), marks=SLOW),
    pytest.param("digits", "at_edm", (), marks=SLOW),
    ("sd15", "tome", ("method.dsap.enabled=true",)),
    pytest.param("sdxl", "tome", ("method.max_downsample=2", "method.merge_mlp=true"), marks=SLOW),
    pytest.param("sd3", "tome", ("method.dsap.enabled=true",), marks=SLOW),
    pytest.param("digits", "tome", ("method.max_downsample=2",), marks=SLOW),
    ("sd15", "deepcache", ()),
    pytest.param("sdxl", "deepcache", (), marks=SLOW),
]


def _id(case):
    f, m, o = case.values if hasattr(case, "values") else case
    return f"{f}-{m}" + ("-" + "-".join(o) if o else "")


@pytest.mark.parametrize("family,method,overrides", CASES, ids=[_id(c) for c in CASES])
def test_fullgraph_bounded_graphs_equal_outputs(tiny_pipes, family, method, overrides):
    pipe = copy.deepcopy(tiny_pipes[family])
    m = _apply(pipe, family, method, *overrides)
    eager = torch.cat([_generate(pipe, family), _generate(pipe, family, seeds=(2, 3))])
    eager_metrics = m.run_metrics()
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    counter = GraphCounter()
    torch._dynamo.reset()
    compile_forward(denoiser, fullgraph=True, backend=counter)  # a graph break raises here
    compiled = torch.cat([_generate(pipe, family), _generate(pipe, family, seeds=(2, 3))])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # Two trajectories of STEPS calls: one graph per distinct per-call plan (DSAP: early and
    # late ratio; DeepCache: full and partial call), never one per step.
    assert 1 <= counter.graphs <= 2, counter.graphs
    # the measured token ratio is the same whether the layers ran eager or traced
    if "token_ratio_measured" in eager_metrics:
        after = m.run_metrics()
        assert after["token_ratio_measured"] == pytest.approx(eager_metrics["token_ratio_measured"])
        assert after["token_layer_calls"] == 2 * eager_metrics["token_layer_calls"]


@pytest.mark.slow
def test_dsap_changes_the_plan_not_the_graph_count_per_step(tiny_pipes):
    """A longer trajectory adds no graph: the traced layers never read the step index. (DSAP's
    early_steps=0.1 makes 1 and 2 early steps here: both trajectories see both ratios.)"""
    counts = {}
    for steps in (10, 20):
        pipe = copy.deepcopy(tiny_pipes["sd15"])
        _apply(pipe, "sd15", "at_edm")
        counter = GraphCounter()
        torch._dynamo.reset()
        compile_forward(pipe.unet, fullgraph=True, backend=counter)
        _generate(pipe, "sd15", steps=steps)
        counts[steps] = counter.graphs
    assert counts[10] == counts[20] == 2, counts


@pytest.mark.slow
@pytest.mark.parametrize("method,overrides", [("at_edm", ()), ("tome", ("method.dsap.enabled=true",)),
                                              ("deepcache", ())])
def test_inductor_close_to_eager(tiny_pipes, method, overrides):
    """CPU inductor over a DSAP trajectory: within 1e-4 of eager (inductor reorders float
    reductions; the measured maximum on tiny_sd15 is printed by -s)."""
    pipe = copy.deepcopy(tiny_pipes["sd15"])
    _apply(pipe, "sd15", method, *overrides)
    eager = _generate(pipe, "sd15")
    torch._dynamo.reset()
    compile_forward(pipe.unet, fullgraph=True)
    compiled = _generate(pipe, "sd15")
    print(f"{method}: max |compiled - eager| = {float((compiled - eager).abs().max()):.2e}")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at_edm", "tome"])
def test_flux_fullgraph_equal_outputs(method):
    """FLUX.1 (packed tokens, grid from img_ids, per-sample rotary rows): also one graph."""
    from edm.models.tiny import tiny_flux

    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    _apply(pipe, "flux", method)

    def gen():
        with torch.no_grad():
            return pipe(prompt=["a cat", "a dog"], num_inference_steps=4, guidance_scale=3.5,
                        height=32, width=32, output_type="pt", max_sequence_length=32,
                        generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

    eager = gen()
    counter = GraphCounter()
    torch._dynamo.reset()
    compile_forward(pipe.transformer, fullgraph=True, backend=counter)
    torch.testing.assert_close(gen(), eager, rtol=0, atol=0)
    assert 1 <= counter.graphs <= 2, counter.graphs
