"""The mapped folders install inside the namespace; nothing named `triton_kernels` or `eval` at top level."""

import subprocess
import sys

import llmopt


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
        "TokenRoutingConfig", "cache_dir", "load_optimized", "patch_model", "save_optimized",
    ]
    for name in llmopt.__all__:
        assert getattr(llmopt, name) is not None
