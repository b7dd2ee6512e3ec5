"""pytest configuration of the paper-table suites (`pytest suites/ --benchmark-only`).

The project's pytest addopts disable pytest-benchmark for the unit tests
(`--benchmark-disable`), which pytest-benchmark refuses to combine with `--benchmark-only`;
the suites *are* benchmarks, so this conftest re-enables it (`--benchmark-enable`).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("specbench suites")
    g.addoption("--paper-models", metavar="DIR",
                help="paper mode: directory holding the papers' targets and drafts as DIR/<hf id> "
                     "(env SPECBENCH_PAPER_MODELS); without it the paper cases are skipped")
    g.addoption("--suite-results", metavar="DIR",
                help="where the cases write their results JSON (env SPECBENCH_SUITE_RESULTS; default runs/suites, "
                     "so the records in results/suites change only when that path is given)")
    g.addoption("--suite-limit", type=int, metavar="N",
                help="prompts per case, for every profile (env SPECBENCH_SUITE_LIMIT)")
    g.addoption("--suite-max-new-tokens", type=int, metavar="N",
                help="new tokens per prompt, for every profile (env SPECBENCH_SUITE_MAX_NEW_TOKENS)")
    g.addoption("--suite-device", metavar="DEV", help="auto | cpu | cuda[:N] (env SPECBENCH_SUITE_DEVICE)")
    g.addoption("--suite-dtype", metavar="DTYPE",
                help="auto | float32 | bfloat16 | float16 (env SPECBENCH_SUITE_DTYPE)")
    g.addoption("--suite-device-map", metavar="MAP", choices=("auto",),
                help="spread every target over the GPUs with accelerate (env SPECBENCH_SUITE_DEVICE_MAP); a target "
                     "larger than its one GPU takes this path by itself")
    g.addoption("--suite-runtime", metavar="RT", choices=("auto", "hf", "fast"),
                help="the target's decoder runtime: auto | hf | fast (env SPECBENCH_SUITE_RUNTIME)")


def pytest_configure(config):
    for line in ("paper: paper mode: the paper's own target and draft (needs --paper-models)",
                 "embedded: embedded mode: SmolLM2-135M on this machine",
                 "claim: a paper's qualitative claim checked as an ordering on the embedded target",
                 "xdist_group(name): cases sharing decodes, kept on one pytest-xdist worker (--dist loadgroup)"):
        config.addinivalue_line("markers", line)
    if hasattr(config.option, "benchmark_enable"):
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def suite(request):
    from _harness import SuiteContext

    ctx = SuiteContext(request.config)
    yield ctx
    ctx.release()
