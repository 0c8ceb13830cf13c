"""The transform contract: registration, the record, save → load_optimized for vanilla and non-vanilla results."""

import json
import pytest
import torch
from tiny_models import tiny_model

from toy_transforms import FailingConfig, MissingConfig, OutputScale, OutputScaleConfig, ScaledNorm, registered_toy_transforms

from llmopt import KVCompressionConfig, OptimizationConfig, load_optimized, patch_model, save_optimized
from llmopt.checkpoint import CheckpointError
from llmopt.config import ConfigError


@pytest.fixture(scope="module", autouse=True)
def toys():
    with registered_toy_transforms():
        yield


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_non_vanilla_round_trip_without_a_tokenizer(tmp_path, token_windows_tiny):
    model = patch_model(tiny_model(), OutputScaleConfig())
    out = save_optimized(model, tmp_path / "toy")
    saved = json.loads((out / "config.json").read_text())
    assert saved["llmopt"] == {"version": 2, "toy_scale": {"init": 1.0}}  # what was done, nothing else
    assert json.loads((out / "llmopt_report.json").read_text())["diagnostics"] == {"toy_scale": {"note": "toy"}}
    reloaded, tokenizer = load_optimized(out)
    assert tokenizer is None
    assert isinstance(reloaded.model.norm, ScaledNorm)
    ids = token_windows_tiny[:2]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


def test_vanilla_kv_round_trip_without_a_tokenizer(tmp_path, token_windows_tiny):
    model = tiny_model(tie_word_embeddings=True)
    patch_model(model, KVCompressionConfig(num_kv_heads=2, calibration_tokens=1024, seq_len=64),
                calibration=token_windows_tiny)
    out = save_optimized(model, tmp_path / "kv")
    reloaded, _ = load_optimized(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = token_windows_tiny[:2]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


def test_every_transform_is_checked_before_any_runs():
    before = OutputScale.calibrated
    model = tiny_model()
    with pytest.raises(ConfigError, match="refused before anything ran"):
        patch_model(model, OptimizationConfig(toy_scale=OutputScaleConfig(), toy_fail=FailingConfig()))
    assert OutputScale.calibrated == before
    assert getattr(model.config, "llmopt", None) is None


def test_a_transform_that_is_not_installed_is_named_before_anything_runs():
    before = OutputScale.calibrated
    with pytest.raises(ConfigError, match="toy_missing is not available in this installation"):
        patch_model(tiny_model(), OptimizationConfig(toy_scale=OutputScaleConfig(), toy_missing=MissingConfig()))
    assert OutputScale.calibrated == before


def test_a_transform_is_not_applied_twice():
    model = patch_model(tiny_model(), OutputScaleConfig())
    with pytest.raises(ConfigError, match="already went through toy_scale"):
        patch_model(model, OutputScaleConfig())


def _saved_toy(tmp_path):
    return save_optimized(patch_model(tiny_model(), OutputScaleConfig()), tmp_path / "toy")


def _edit_config(out, edit):
    data = json.loads((out / "config.json").read_text())
    edit(data)
    (out / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c["llmopt"].update(version=9), CheckpointError, "config version 9 is not supported"),
    (lambda c: c["llmopt"].update(quantize={}), CheckpointError, "no such transform; available:"),
    (lambda c: c["llmopt"]["toy_scale"].update(init=-1), CheckpointError, "toy_scale.init must be positive"),
])
def test_bad_records_are_refused(tmp_path, edit, error, message):
    out = _saved_toy(tmp_path)
    _edit_config(out, edit)
    with pytest.raises(error, match=None) as raised:
        load_optimized(out)
    assert message in str(raised.value)


def test_missing_weights_and_corrupt_files_are_refused(tmp_path):
    out = _saved_toy(tmp_path)
    _edit_config(out, lambda c: c.pop("llmopt"))  # a plain model cannot take the extra scale
    with pytest.raises(CheckpointError, match="missing model.norm.weight; unexpected model.norm.norm.weight"):
        load_optimized(out)
    (out / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_optimized(out)
    out = _saved_toy(tmp_path / "again")
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_optimized(out)


def test_import_llmopt_imports_no_transform_module():
    import subprocess
    import sys

    code = ("import sys, llmopt; from llmopt import OptimizationConfig; "
            "OptimizationConfig.from_dict({'kv': {'num_kv_heads': 1}, 'routing': {}, 'sparse': {}}); "
            "print(sorted(m for m in sys.modules if m.startswith('llmopt.') and m.endswith('.transform')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
