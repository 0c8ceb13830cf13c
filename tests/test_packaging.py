"""The mapped folders install inside the namespace; nothing named `triton_kernels` or `eval` at top level."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import llmopt

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"llmopt": "llmopt", "triton_kernels": "llmopt/triton_kernels", "eval": "llmopt/eval"}


def test_no_top_level_triton_kernels_or_eval(tmp_path):
    code = ("import importlib.util as u; import llmopt.triton_kernels, llmopt.eval; "
            "print(u.find_spec('triton_kernels'), u.find_spec('eval'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "None"]


def test_import_changes_nothing_in_transformers():
    code = ("import transformers.models.llama.modeling_llama as m; before = dict(vars(m)); import llmopt; "
            "assert {k for k in vars(m) if vars(m)[k] is not before.get(k)} == set(), 'llmopt patched transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api():
    assert sorted(llmopt.__all__) == [
        "HealingConfig", "KVCompressionConfig", "OptimizationConfig", "SparseAttentionConfig",
        "TokenRoutingConfig", "cache_dir", "load_optimized", "patch_model", "register_transform", "save_optimized",
    ]
    for name in llmopt.__all__:
        assert getattr(llmopt, name) is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from the tracked files alone (a copy: the build leaves nothing in the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files + [str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.py") if ".venv" not in p.parts]:
        if (ROOT / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp / "dist"), str(tmp / "src")], check=True, capture_output=True)
    return zipfile.ZipFile(next((tmp / "dist").glob("llmopt-*.whl")))


def test_the_wheel_holds_every_package_inside_the_namespace(wheel):
    names = set(wheel.namelist())
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).glob("**/__init__.py"):
            if ".venv" not in init.parts:
                inside = f"{package}/{init.relative_to(ROOT / folder).as_posix()}"
                assert inside in names, f"{inside} missing from the wheel"
    assert "llmopt/py.typed" in names
    assert not any(name.startswith(("triton_kernels/", "eval/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[llmopt.transforms]" in wheel.read(entry_points).decode()
