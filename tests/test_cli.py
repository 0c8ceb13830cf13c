import pytest
from tiny_models import tiny_model

from llmopt.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return path


def test_info_on_a_local_directory(tiny_dir, capsys):
    assert main(["info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "KV heads                   4" in out
    assert "KV bytes/token (bfloat16)  768" in out  # 2 (K,V) · 3 layers · 4 heads · 16 dims · 2 bytes


def test_calibrate_refuses_an_existing_output_before_any_work(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kv:\n  num_kv_heads: 2\n  method: mean-pool\n")
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    assert main(["calibrate", "--model", str(tiny_dir), "--config", str(recipe), "--out", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "user data"


def test_bad_recipe_and_unknown_model_are_clear_errors(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kv:\n  num_kv_heads: 2\n  methd: mean-pool\n")
    assert main(["calibrate", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key(s) methd" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "no model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_refuses_an_unknown_section(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sections", "kv-capacity", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--baselines", "nope"], "unknown --baseline nope: the recipe's transforms (kv) offer calibrated, keep-one, svd-w"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["--max-loss", "0.03"], "kv.max_loss searches over the calibrated fold: set method: calibrated"),
])
def test_calibrate_refuses_bad_arguments_before_loading_a_model(tmp_path, capsys, extra, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kv:\n  num_kv_heads: 2\n  method: mean-pool\n")
    args = ["calibrate", "--model", str(tmp_path / "no-model-here"), "--config", str(recipe), "--out",
            str(tmp_path / "o"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err  # not "no model": nothing was loaded


def test_yaml_syntax_errors_and_corrupt_configs_are_messages(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kv:\n  num_kv_heads: [2\n")
    assert main(["calibrate", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "r.yaml is not valid YAML" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{ not json")
    assert main(["info", str(model)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_serve_refuses_what_vllm_cannot_serve_before_starting(tmp_path, capsys):
    from toy_transforms import registered_toy_transforms

    model = tmp_path / "scaled"
    model.mkdir()
    (model / "config.json").write_text('{"llmopt": {"version": 2, "toy_scale": {}}}')
    with registered_toy_transforms():
        assert main(["serve", str(model)]) == 2
    assert "uses toy_scale, which needs llmopt's vLLM plugin" in capsys.readouterr().err


def test_training_minutes_sum_the_training_runs_the_transforms_report():
    from llmopt.calibrate import training_minutes

    reports = {"kv": {"fold_seconds": 50.0, "healing": {"seconds": 720.0, "curve": [1.0]}},
               "routing": {"training": {"seconds": 30.0, "curve": [2.0]}}}
    assert training_minutes(reports) == {"training_minutes": 12.5}
    assert training_minutes({"kv": {"fold_seconds": 50.0}}) == {}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama (4 KV heads) and a tiny GPT-2, each with the default model's tokenizer, as calibrate loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from llmopt.models.default import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("smollm2-135m"))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97))
    paths = {}
    for name, model in (("llama", tiny_model()), ("gpt2", gpt2)):
        paths[name] = tmp_path_factory.mktemp(name) / "model"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("model, recipe, text, message", [
    ("llama", "kv:\n  num_kv_heads: 3\n", None, "3 KV heads do not divide the model's 4 KV heads"),
    ("llama", "kv:\n  num_kv_heads: 2\n", "Too few words.", "the text holds 5 tokens, fewer than one window of 512"),
    ("llama", "kv:\n  num_kv_heads: 2\n", "", "the text holds 0 tokens"),
    ("gpt2", "kv:\n  num_kv_heads: 1\n", None, "class has no KV-head count (num_key_value_heads)"),
    ("llama", "kv:\n  num_kv_heads: 2\n  method: mean-pool\nrouting:\n  dense_blocks: [7]\n", None,
     "routing.dense_blocks [7] are not blocks of this 3-block model"),
])
def test_calibrate_checks_the_recipe_against_the_model_and_text_before_measuring(
        tiny_dirs, tmp_path, capsys, monkeypatch, model, recipe, text, message):
    import llmopt.eval.suite

    monkeypatch.setattr(llmopt.eval.suite, "evaluate_model", lambda *a, **k: pytest.fail("measured before refusing"))
    (tmp_path / "r.yaml").write_text(recipe)
    args = ["calibrate", "--model", str(tiny_dirs[model]), "--config", str(tmp_path / "r.yaml"),
            "--out", str(tmp_path / "o")]
    if text is not None:
        (tmp_path / "text.txt").write_text(text)
        args += ["--calibration", str(tmp_path / "text.txt")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
