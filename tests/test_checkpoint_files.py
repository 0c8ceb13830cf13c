"""Damaged checkpoints: every loader (load_optimized, load_model, and the CLI's info, eval, calibrate and serve)
refuses each kind of damage with a CheckpointError naming the file and what is wrong, before any weight is read."""

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_model

from llmopt import load_optimized, save_optimized
from llmopt.checkpoint_files import INDEX_FILE, CheckpointError, check_checkpoint
from llmopt.cli import main
from llmopt.models import load_model

RECIPE = str(Path(__file__).resolve().parent.parent / "configs" / "kv-3to1.yaml")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_optimized(tiny_model(), tmp_path_factory.mktemp("good") / "model")


def _edit_config(path, **changes):
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


def _split_into_two_shards(path):
    """The weights as an index and two shards, as save_pretrained writes large models."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, path / shard, metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {
        name: shard for shard, shard_names in shards.items() for name in shard_names}}))


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def _missing_shard(path):
    _split_into_two_shards(path)
    (path / "model-00002-of-00002.safetensors").unlink()


DAMAGES = {
    "zero-length weights": (lambda path: (path / "model.safetensors").write_bytes(b""),
                            "model.safetensors is truncated (0 bytes"),
    "truncated weights": (_truncate, "model.safetensors is truncated: its tensors need"),
    "not a safetensors file": (lambda path: (path / "model.safetensors").write_bytes(b"<html>Not Found</html>" * 9),
                               "model.safetensors is truncated or not a safetensors file: its header claims"),
    "an index naming a missing shard": (_missing_shard, f"{INDEX_FILE} names model-00002-of-00002.safetensors, "
                                                        "which is not in"),
    "shapes that disagree with config.json": (lambda path: _edit_config(path, intermediate_size=96),
                                              "model.layers.0.mlp.down_proj.weight has shape [64, 128], but"),
    "a record of a newer version": (lambda path: _edit_config(path, llmopt={"version": 3, "kv": {"num_kv_heads": 2}}),
                                    "config version 3 is not supported; this llmopt reads version 2"),
    "a record of an unknown transform": (lambda path: _edit_config(path, llmopt={"version": 2, "quantize": {}}),
                                         "unknown key(s) quantize in the config: no such transform"),
    "config.json that is not JSON": (lambda path: (path / "config.json").write_text("{ not json"),
                                     "config.json is corrupt (not JSON"),
    "no weights": (lambda path: (path / "model.safetensors").unlink(), "holds no *.safetensors weights"),
}


@pytest.fixture(params=list(DAMAGES))
def damaged(request, saved, tmp_path):
    damage, message = DAMAGES[request.param]
    path = shutil.copytree(saved, tmp_path / "damaged")
    damage(path)
    return path, message


def test_every_loader_names_the_damage(damaged, capsys, monkeypatch):
    path, message = damaged
    for load in (load_optimized, load_model):
        with pytest.raises(CheckpointError) as raised:
            load(str(path))
        assert message in str(raised.value)
        assert str(path) in str(raised.value)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("serve started vLLM on a damaged checkpoint"))
    for command in (["info", str(path)], ["serve", str(path)],
                    ["calibrate", "--model", str(path), "--config", RECIPE, "--out", str(path / "o")],
                    ["eval", "--reference", str(path), "--tasks", "wikipedia-ppl", "--out", str(path / "o")]):
        assert main(command) == 2
        assert message in capsys.readouterr().err
    assert not (path / "o").exists()


def test_a_whole_sharded_checkpoint_passes_and_loads(saved, tmp_path):
    path = shutil.copytree(saved, tmp_path / "sharded")
    _split_into_two_shards(path)
    assert [file.name for file in check_checkpoint(path)] == ["model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"]
    model, _ = load_optimized(path)
    assert model.config.num_key_value_heads == 4
