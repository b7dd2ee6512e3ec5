"""The GPU device check (run through scripts/gpu_check.sh, which installs a CUDA torch first).

    python scripts/gpu_check.py --out gpu-check

On the first CUDA device, each step a subprocess with its own time limit (the whole check is sized for
under 8 minutes on one GPU):

1. the verifier's property and mutation tests on cuda (tests/test_verify*.py, the ``cuda`` cases);
2. the end-to-end losslessness tests on the tiny model on cuda in float32
   (tests/test_lossless_e2e.py with SPECBENCH_TEST_DEVICE=cuda) and in bfloat16/float16
   (tests/test_half_precision.py, the same);
3. every method on the embedded target on cuda: 3 MT-bench prompts x 64 tokens, greedy, with the
   vanilla twin (greedy identity, tau, speedup), CUDA-event timing;
4. `suites/tree_cost.py` on the GPU (forward cost over n tokens).

Everything lands under --out: a JUnit XML per test step, a results JSON per method, the forward-cost
JSON, gpu_check.log (every step's output) and summary.json; the summary table is printed at the end.
Exit status 0 when every step passed, 1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts of a pytest JUnit XML (all zero when it is missing)."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": n - failed - skipped, "failed": failed, "skipped": skipped}


def method_row(path: Path) -> dict:
    """method, tau, speedup and greedy identity of a specbench results file."""
    doc = json.loads(path.read_text())
    method = doc["config"]["method"]
    s = doc["summary"]
    g = s.get("greedy_identical") or {}
    return {"method": method, "tau": round(s[method]["tau"], 3), "speedup": round(s[method].get("speedup", 0), 3),
            "greedy_identical": f"{g.get('identical', '?')}/{g.get('compared', '?')}"}


def methods_to_run() -> list[tuple[str, list[str]]]:
    """(method, extra args) for every method that can run on the embedded target without training first."""
    from specbench.methods import available_methods
    from specbench.methods.head_drafters import default_checkpoint_dir
    from specbench.models.draft_heads import CheckpointError

    def committed(name: str) -> bool:
        try:
            return default_checkpoint_dir(name).is_dir()
        except (CheckpointError, AttributeError):  # no committed draft, or a method the catalogue does not know
            return False

    out = []
    for name, m in available_methods().items():
        if name == "vanilla":
            continue  # the twin of every other run
        if not m.needs_checkpoint or committed(name):
            out.append((name, []))
        elif name == "sps":
            out.append((name, ["--param", "checkpoint=prefix:4"]))  # the target's own layer prefix
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    import torch
    from tabulate import tabulate

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device: torch {torch.__version__} sees none (a CPU build, or no driver); run "
              "scripts/gpu_check.sh on a GPU machine", file=sys.stderr)
        return 2
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "a")
    py = sys.executable
    cuda_env = {"SPECBENCH_TEST_DEVICE": args.device}
    steps = [
        ("verifier (cuda)", [py, "-m", "pytest", "-q", "tests/test_verify.py", "tests/test_verify_mutations.py",
                             "-k", "cuda", "--junitxml", str(out / "verify.xml")], {}, 120),
        ("lossless e2e fp32 (cuda)", [py, "-m", "pytest", "-q", "tests/test_lossless_e2e.py",
                                      "--junitxml", str(out / "e2e_fp32.xml")], cuda_env, 180),
        ("lossless bf16/fp16 (cuda)", [py, "-m", "pytest", "-q", "tests/test_half_precision.py",
                                       "--junitxml", str(out / "e2e_half.xml")], cuda_env, 90),
    ]
    for name, extra in methods_to_run():
        steps.append((f"method {name}", [py, "-m", "specbench.cli", "run", "--method", name, "--dataset", "mt_bench",
                                         "--limit", "3", "--max-new-tokens", "64", "--device", args.device,
                                         "--timing", "step", "--no-resume", "--no-progress",
                                         "--out", str(out / "runs" / f"{name}.json"), *extra], {}, 60))
    steps.append(("tree_cost (gpu)", [py, "suites/tree_cost.py", "--device", args.device, "--reps", "5",
                                      "--out", str(out / "tree_cost_gpu.json")], {}, 60))
    results = []
    for name, cmd, env, limit in steps:
        t0 = time.perf_counter()
        log.write(f"\n=== {name}: {' '.join(cmd)}\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        row = {"step": name, "status": "ok" if rc == 0 else f"FAILED ({rc})",
               "seconds": round(time.perf_counter() - t0, 1)}
        xml = next((Path(c) for i, c in enumerate(cmd) if i and cmd[i - 1] == "--junitxml"), None)
        if xml is not None:
            row.update(junit_counts(xml))
        results.append(row)
        print(f"{name}: {row['status']} in {row['seconds']} s", flush=True)
    methods = [method_row(p) for p in sorted((out / "runs").glob("*.json"))]
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": results,
               "methods": methods}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nGPU check on {summary['device']} (torch {summary['torch']}); everything under {out}")
    print(tabulate(results, headers="keys"))
    if methods:
        print()
        print(tabulate(methods, headers="keys"))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
