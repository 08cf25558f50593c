"""twintune.api.load: trained adapters of every method used from Python, several on one loaded base,
switched by name without reading the base again; PEFT's adapters too; on both backends."""

import numpy as np
import pytest
import torch

import twintune.api as api
import twintune.train.build as build
from model_helpers import write_tiny_llama
from twintune.backends import backend_class
from twintune.errors import TwintuneError
from twintune.formats.checkpoint import load_checkpoint
from twintune.formats.tiny_model import builtin_model_dir, write_tiny_model
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.recipe import load_recipe
from twintune.train.loop import train
from twintune.train.runs import open_run, predict_texts

BACKENDS = ["mlx", "torch"]
MODEL = "builtin:tiny-gpt-neo"
TEMPLATE = "Review: {text}\nMood:"  # the IA3 run's own prompt, which predictions must follow
METHODS = {
    "lora": ["method.r=4"],
    "ia3": ["method={name: ia3}", 'prompt.template="Review: {text}\\nMood:"'],
    "bitfit": ["method={name: bitfit}"],
    # slot methods: virtual keys and values (saved as their projected form), a module after each sublayer
    "prefix": ["method={name: prefix, n: 4, projection: true, encoder_hidden_size: 16}"],
    "adapter": ["method={name: adapter, style: houlsby}"],
}
TEXTS = ["Operating profit rose to EUR 13.1 mn .", "The company reported a loss .", "Sales were flat ."]


def _recipe(*overrides):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       ["train.max_steps=3", "data.synthetic_size=60", "train.lr=1e-2", "train.warmup_steps=0",
                        "train.eval_batch_size=64", *overrides])


def _ids(length: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (2, length)).astype(np.int32)


def _assert_close(ours: np.ndarray, reference: np.ndarray, tol: float = 1e-6) -> None:
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < tol, f"logits differ by {error:.2e} of their scale"


@pytest.fixture(scope="module", params=BACKENDS)
def runs(request, tmp_path_factory):
    """Three tiny runs (LoRA, IA3, BitFit) trained once per backend, with each run's own logits
    (as open_run gives them) and the base model's."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"runs-{backend}")
    dirs, logits = {}, {}
    for name, overrides in METHODS.items():
        dirs[name] = out / name
        train(_recipe(*overrides), backend, out_dir=dirs[name], progress=False)
        logits[name] = open_run(dirs[name], backend, with_data=False).backend.logits(_ids())
    logits[None] = api.load(MODEL, backend=backend).logits(_ids())
    return backend, dirs, logits


def test_a_run_loads_with_the_runs_logits(runs):
    backend, dirs, logits = runs
    for name, directory in dirs.items():
        for target in (directory, directory / "adapter"):
            model = api.load(MODEL, adapter=target, backend=backend)
            assert (model.active, model.adapters) == ("default", ["default"])
            _assert_close(model.logits(_ids()), logits[name])
            assert not np.allclose(logits[name], logits[None])  # the adapter does something
    assert model.logits(_ids()[0]).shape == (1, 20, 1024)  # one row of ids is a batch of one
    _assert_close(api.load(None, adapter=dirs["ia3"], backend=backend).logits(_ids()), logits["ia3"])  # its model


def test_a_float64_base_switches_adapters_in_float64(runs):
    backend, dirs, logits = runs
    model = api.load(MODEL, adapter=dirs["lora"], backend=backend, dtype="float64")
    model.add_adapter("bitfit", dirs["bitfit"])
    model.set_adapter("bitfit")
    got = model.logits(_ids())
    assert got.dtype == np.float64
    _assert_close(got, logits["bitfit"], tol=1e-4)  # the float32 run's, to float32's precision
    model.set_adapter(None)
    checkpoint = load_checkpoint(MODEL)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    fresh = backend_class(backend)(spec, gpt_neo_weights(spec, checkpoint.weights), dtype="float64")
    np.testing.assert_array_equal(model.logits(_ids()), fresh.logits(_ids()))
    with pytest.raises(TwintuneError, match="dtype must be one of"):
        api.load(MODEL, backend=backend, dtype="float8")


def test_the_base_model_is_a_fresh_backend_without_a_method(runs):
    backend, _, logits = runs
    checkpoint = load_checkpoint(MODEL)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    fresh = backend_class(backend)(spec, gpt_neo_weights(spec, checkpoint.weights))
    np.testing.assert_array_equal(logits[None], fresh.logits(_ids()))


def test_adapters_switch_on_one_base_without_reading_it_again(runs, monkeypatch):
    backend, dirs, logits = runs
    model = api.load(MODEL, adapter=dirs["lora"], backend=backend)
    engine, module = model.backend, model.backend.model
    monkeypatch.setattr(build, "load_checkpoint", lambda *a: pytest.fail("the base checkpoint was read again"))
    monkeypatch.setattr(build, "backend_class", lambda *a: pytest.fail("a backend was built again"))
    model.add_adapter("ia3", dirs["ia3"])
    model.add_adapter("bitfit", dirs["bitfit"])
    model.add_adapter("prefix", dirs["prefix"])
    model.add_adapter("adapter", dirs["adapter"])
    assert model.adapters == ["default", "ia3", "bitfit", "prefix", "adapter"] and model.active == "default"

    first = {}
    for name, run in [("ia3", "ia3"), ("bitfit", "bitfit"), (None, None), ("prefix", "prefix"), ("default", "lora"),
                      ("adapter", "adapter"), ("bitfit", "bitfit"), ("prefix", "prefix"), ("ia3", "ia3"),
                      (None, None), ("adapter", "adapter"), ("default", "lora"), ("ia3", "ia3")]:
        model.set_adapter(name)
        assert model.active == name
        got = model.logits(_ids())
        _assert_close(got, logits[run])
        np.testing.assert_array_equal(got, first.setdefault(name, got))  # back and forth: identical
        trainable = model.backend.trainable_state()
        expected = model._adapters[name].state if name else {}
        assert set(trainable) == set(expected)
        assert all(np.array_equal(trainable[k], v) for k, v in expected.items())
    assert model.backend is engine and model.backend.model is module


def test_the_base_biases_come_back_exactly_after_bitfit(runs):
    backend, dirs, _ = runs
    model = api.load(MODEL, adapter=dirs["bitfit"], backend=backend)
    names = list(model._adapters["default"].state)
    base = {name: np.array(model.base.weights[name]) for name in names}
    model.set_adapter(None)
    model.set_adapter("default")
    model.set_adapter(None)
    params = _parameters(model)
    for name in names:
        assert np.array_equal(params[name], base[name]), name
    assert any(not np.array_equal(model._adapters["default"].state[n], base[n]) for n in names)  # it trained


def _parameters(model) -> dict[str, np.ndarray]:
    if model.backend.name == "torch":
        return {k: v.detach().cpu().numpy() for k, v in model.backend.model.named_parameters()}
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.backend.model.parameters())}


def test_predict_gives_the_runs_predictions_with_its_prompt(runs):
    backend, dirs, _ = runs
    model = api.load(MODEL, adapter=dirs["lora"], backend=backend)
    model.add_adapter("ia3", dirs["ia3"])
    for name, run in [("default", "lora"), ("ia3", "ia3")]:
        model.set_adapter(name)
        ours, theirs = model.predict(TEXTS), predict_texts(dirs[run], TEXTS, backend)
        assert [p["label"] for p in ours] == [p["label"] for p in theirs]
        assert [p["text"] for p in ours] == TEXTS
        for a, b in zip(ours, theirs):
            assert list(a["probabilities"]) == ["negative", "neutral", "positive"]
            np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), rtol=1e-5)
    assert model.prompt.template == TEMPLATE
    model.set_adapter(None)
    assert model.prompt.template == "Sentence: {text}\nSentiment:"  # the recipe defaults
    assert len(model.predict("one text")) == 1


def test_labels_and_template_given_to_load_win(runs):
    backend, dirs, _ = runs
    model = api.load(MODEL, adapter=dirs["ia3"], backend=backend, labels=["positive", "negative"],
                     template="{text} =>")
    assert model.prompt.label_words == {"positive": " positive", "negative": " negative"}
    assert model.prompt.template == "{text} =>"
    assert {p["label"] for p in model.predict(TEXTS)} <= {"positive", "negative"}


def test_errors_name_what_is_wrong(runs, tmp_path):
    backend, dirs, _ = runs
    model = api.load(MODEL, adapter=dirs["lora"], backend=backend)
    with pytest.raises(TwintuneError, match="no adapter named 'nope'; adapters: 'default'"):
        model.set_adapter("nope")
    with pytest.raises(TwintuneError, match="already an adapter named 'default'"):
        model.add_adapter("default", dirs["ia3"])
    other = write_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=128)
    for name in ("lora", "bitfit"):
        with pytest.raises(TwintuneError, match="does not match this base model|different base model"):
            api.load(str(other), adapter=dirs[name], backend=backend)
    with pytest.raises(TwintuneError, match="does not exist"):
        model.add_adapter("missing", tmp_path / "nowhere")
    assert model.adapters == ["default"] and model.active == "default"


def test_a_quantized_run_loads_on_its_nf4_base(runs, tmp_path):
    backend, dirs, _ = runs
    run_dir = tmp_path / "qlora"
    train(_recipe("quantize.type=nf4", "train.max_steps=1"), backend, out_dir=run_dir, progress=False)
    model = api.load(MODEL, adapter=run_dir, backend=backend)
    assert model.base.quantized
    _assert_close(model.logits(_ids()), open_run(run_dir, backend, with_data=False).backend.logits(_ids()))
    with pytest.raises(TwintuneError, match="quantize.type 'nf4'.*this model's base has 'none'"):
        api.load(MODEL, adapter=dirs["lora"], backend=backend).add_adapter("q", run_dir)


# ---- PEFT's own adapters -------------------------------------------------------------------------

def _peft_configs():
    from peft import IA3Config, LoraConfig

    return {
        "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "dora": LoraConfig(r=4, target_modules=["k_proj", "c_fc"], use_dora=True, init_lora_weights=False),
        "ia3": IA3Config(target_modules=["v_proj", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False),
    }


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Adapters saved by PEFT (LoRA, DoRA, IA3; random values, so each changes the logits) with PEFT's logits."""
    from peft import get_peft_model
    from transformers import GPTNeoForCausalLM

    adapters = {}
    for name, config in _peft_configs().items():
        torch.manual_seed(0)
        hf = GPTNeoForCausalLM.from_pretrained(str(builtin_model_dir("tiny-gpt-neo")), dtype=torch.float32)
        peft_model = get_peft_model(hf, config).eval()
        directory = tmp_path_factory.mktemp("peft") / name
        peft_model.save_pretrained(str(directory))
        with torch.no_grad():
            adapters[name] = directory, peft_model(torch.from_numpy(_ids()).long()).logits.float().numpy()
    return adapters


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_adapters_give_peft_logits(peft_adapters, backend):
    model = api.load(MODEL, adapter=peft_adapters["lora"][0], backend=backend)
    assert model._adapters["default"].method.name == "lora"
    base = api.load(MODEL, backend=backend).logits(_ids())
    for name, (directory, _) in peft_adapters.items():
        model.add_adapter(name, directory)
    for name in ["default", "dora", "ia3", "lora", None, "dora"]:
        model.set_adapter(name)
        reference = peft_adapters["lora" if name == "default" else name][1] if name else base
        _assert_close(model.logits(_ids()), reference, tol=1e-5)
        assert name is None or not np.allclose(reference, base)
    assert model._adapters["dora"].method.name == "dora" and model._adapters["ia3"].method.name == "ia3"


# ---- a model of one of mlx-lm's families (MLX only) -------------------------------------------------

def test_adapters_switch_on_an_mlx_lm_model(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    runs = {}
    for name, targets in [("qv", "[q_proj,v_proj]"), ("mlp", "[up_proj,down_proj]")]:
        runs[name] = tmp_path / name
        train(_recipe(f"model={model_dir}", f"method.target_modules={targets}", "train.max_steps=2"), "mlx",
              out_dir=runs[name], progress=False)
    model = api.load(str(model_dir), adapter=runs["qv"], backend="mlx")
    model.add_adapter("mlp", runs["mlp"])
    for name, run in [("mlp", "mlp"), ("default", "qv"), ("mlp", "mlp")]:
        model.set_adapter(name)
        _assert_close(model.logits(_ids()), open_run(runs[run], "mlx", with_data=False).backend.logits(_ids()))
    assert [p["label"] for p in model.predict(TEXTS)] == [p["label"] for p in predict_texts(runs["mlp"], TEXTS, "mlx")]
