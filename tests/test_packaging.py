"""The built wheel carries what an installed specbench needs: prompts, default draft heads, methods."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("specbench-*.whl")
    return whl


def _tracked(under: str) -> set[str]:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", under], capture_output=True, text=True,
                           check=True).stdout.split()
    return {f for f in files if not f.endswith(".md") or f.startswith("specbench/data/")}


def test_wheel_holds_every_vendored_prompt_file_and_checkpoint_file(wheel):
    """All but the fidelity study's heads of other training seeds (pyproject's exclude-package-data), which
    stay in the repository."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for under in ("specbench/data", "specbench/checkpoints"):
        expected = _tracked(under)
        assert expected, f"nothing tracked under {under}"
        seeds = {f for f in expected if fnmatch.fnmatch(f, "specbench/checkpoints/*-s[0-9]*/*")}
        assert expected - seeds <= names, f"missing from the wheel: {sorted(expected - seeds - names)}"
        assert not seeds & names, f"other-seed heads in the wheel: {sorted(seeds & names)}"


def test_installed_wheel_finds_its_default_head_and_prompts_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import json, specbench\n"
        "from specbench.methods import available_methods\n"
        "from specbench.methods.head_drafters import default_checkpoint_dir\n"
        "from specbench.bench.datasets import load_prompts\n"
        "d = default_checkpoint_dir()\n"
        "print(json.dumps({'package': specbench.__file__, 'head': str(d),\n"
        "                  'head_files': sorted(p.name for p in d.iterdir()),\n"
        "                  'methods': sorted(available_methods()), 'prompts': len(load_prompts('mt_bench'))}))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    got = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, check=True).stdout)
    assert Path(got["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(got["head"]).is_relative_to(site)
    assert {"config.json", "model.safetensors", "draft_vocab.json", "MANIFEST.json"} <= set(got["head_files"])
    assert {"vanilla", "pld", "lookahead", "eagle", "eagle2"} <= set(got["methods"])
    assert got["prompts"] == 80
