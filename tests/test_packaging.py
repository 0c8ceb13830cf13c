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


def test_the_source_tree_imports_whole_from_the_repository_root():
    """`python -m pytest` from the root puts the source tree first on sys.path: it must be complete."""
    code = "import llmopt.eval.suite, llmopt.triton_kernels.block_sparse_attention; print(llmopt.eval.__path__[0])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(ROOT / "llmopt" / "eval")


def test_import_changes_nothing_in_transformers():
    code = ("import transformers.models.llama.modeling_llama as m; before = dict(vars(m)); import llmopt; "
            "assert {k for k in vars(m) if vars(m)[k] is not before.get(k)} == set(), 'llmopt patched transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api():
    assert sorted(llmopt.__all__) == [
        "HealingConfig", "KVCompressionConfig", "LayerHealingConfig", "OptimizationConfig", "SparseAttentionConfig",
        "TokenRoutingConfig", "cache_dir", "load_optimized", "patch_model", "register_transform", "save_optimized",
    ]
    for name in llmopt.__all__:
        assert getattr(llmopt, name) is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from the files git would commit, symlinks kept (a copy: the build leaves nothing behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        source, copy = ROOT / name, tmp / "src" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(source.readlink())
        elif source.is_file():
            shutil.copy(source, copy)
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
