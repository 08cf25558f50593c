"""PEFT interop beyond plain LoRA, both ways, on both backends: DoRA, IA3, and LoRA's rank_pattern /
alpha_pattern / layers_to_transform. A twintune adapter trained a few steps gives PEFT's logits in
PEFT; a PEFT adapter (random, non-trivial values) gives PEFT's logits in twintune, and merged into
a transformers checkpoint; options twintune's DoRA/IA3 cannot express are refused by name."""

import json
import shutil

import numpy as np
import pytest
import torch

from model_helpers import hf_model, torch_logits
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, our_name, save_adapter
from twintune.formats.checkpoint import load_checkpoint
from twintune.formats.merge import write_checkpoint
from twintune.formats.tiny_model import builtin_model_dir
from twintune.methods import IA3, BaseModel, DoRA, LoRA
from twintune.methods.dora import row_norms
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
TARGETS = ["q_proj", "v_proj", "c_fc"]

# ---- helpers (as in test_peft_roundtrip.py) ------------------------------------------------------


def _recipe(method, *overrides):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       ["train.max_steps=3", "data.synthetic_size=120", "train.lr=1e-2", f"method={method}",
                        *overrides])


def _ids(spec: GPTNeoSpec, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, (1, length)).astype(np.int32)


def _error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _assert_same_logits(ours: np.ndarray, reference: np.ndarray, tol: float = 1e-5) -> None:
    error = _error(ours, reference)
    assert error < tol, f"logits differ by {error:.2e} of their scale"


def _settings(method) -> dict:
    """A method's keys with name lists sorted (a recipe keeps its order, an adapter_config sorts)."""
    return {k: sorted(v) if isinstance(v, list) else v for k, v in method.to_dict().items()}


def _peft_layers(peft_model) -> dict[str, dict]:
    """How PEFT built each adapted layer: LoRA/DoRA rank and scale, IA3 input or output scaling."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            layers[name] = {"r": module.r["default"], "scale": pytest.approx(module.scaling["default"], rel=1e-12),
                            "dora": bool(module.use_dora["default"])}
        elif isinstance(module, IA3Layer):
            layers[name] = {"feedforward": module.is_feedforward}
    return layers


def _planned_layers(method, plan) -> dict[str, dict]:
    """The same, as twintune's plan has it."""
    layers = {}
    for target, surgery in plan.wrapped().items():
        if isinstance(method, IA3):
            layers[target] = {"feedforward": surgery.layer.feedforward}
        else:
            layers[target] = {"r": surgery.values[f"{target}.lora_A.weight"].shape[0], "scale": surgery.layer.scale,
                              "dora": isinstance(method, DoRA)}
    return layers


@pytest.fixture(scope="module")
def tiny():
    """The built-in tiny GPT-Neo: (model directory, spec, canonical float32 weights)."""
    model_dir = builtin_model_dir("tiny-gpt-neo")
    checkpoint = load_checkpoint(str(model_dir))
    spec = GPTNeoSpec.from_config(checkpoint.config)
    return model_dir, spec, gpt_neo_weights(spec, checkpoint.weights)


# ---- twintune -> PEFT --------------------------------------------------------------------------

TO_PEFT = {  # case -> the recipe's method
    "dora": "{name: dora, r: 4, alpha: 8, target_modules: [q_proj, v_proj, c_fc]}",
    "ia3": "{name: ia3}",  # PEFT's gpt_neo default: q_proj, v_proj, c_proj (c_proj feed-forward)
    "ia3-kv-ff": "{name: ia3, target_modules: [k_proj, v_proj, c_fc], feedforward_modules: [c_fc]}",
    "lora-patterns": "{name: lora, r: 4, alpha: 8, rank_pattern: {c_fc: 2}, alpha_pattern: {v_proj: 32}, "
                     "target_modules: [q_proj, v_proj, c_fc]}",
    "lora-layers": "{name: lora, r: 4, alpha: 8, target_modules: [q_proj, v_proj, c_fc], layers_to_transform: [1, 3]}",
}


def _assert_trained(start, state) -> None:
    """Three steps moved every value off its start (IA3 starts at ones, DoRA's magnitude at row norms)."""
    assert set(state) == set(start)
    for name, value in state.items():
        if ".lora_A." in name:
            continue  # A starts random; B (and the magnitude) say whether the layer trained
        assert np.abs(value - start[name]).max() > 1e-6, f"{name} did not train"


@pytest.mark.parametrize("case", list(TO_PEFT))
@pytest.mark.parametrize("backend", BACKENDS)
def test_trained_twintune_adapter_gives_the_same_logits_in_peft(backend, case, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    run = prepare(_recipe(TO_PEFT[case]), backend)
    start = {name: value.copy() for name, value in run.plan.initial_values().items()}
    for step in range(3):
        train_step(run, step)
    state = run.backend.trainable_state()
    _assert_trained(start, state)
    adapter_dir = save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model)

    peft_model = PeftModel.from_pretrained(hf_model(run.model_dir), str(adapter_dir)).eval()
    # PEFT reads adapter_config.json as twintune planned: the same layers, ranks, scales, IA3 kinds...
    assert _peft_layers(peft_model) == _planned_layers(run.method, run.plan)
    # ...and holds exactly the saved values (none left at PEFT's own init).
    held = {our_name(k): v.float().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert set(held) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(held[name].reshape(value.shape), value, err_msg=name)

    ids = _ids(run.spec)
    reference = torch_logits(peft_model, ids)
    _assert_same_logits(run.backend.logits(ids), reference)
    with peft_model.disable_adapter():  # the adapter matters
        assert _error(torch_logits(peft_model, ids), reference) > 1e-4

    # And back: twintune reads its own adapter to the same settings and values, bit for bit.
    method, loaded = load_adapter(adapter_dir, run.spec)
    assert type(method) is type(run.method)
    assert _settings(method) == _settings(run.method)
    assert set(loaded) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_what_the_twintune_cases_adapt(tiny):
    """The recipes above select what their names say (so the PEFT comparisons cover those options)."""
    _, spec, weights = tiny
    base = BaseModel(spec, weights)
    methods = {case: _recipe(method).method for case, method in TO_PEFT.items()}
    plans = {case: m.plan(base, 0).wrapped() for case, m in methods.items()}

    ia3 = plans["ia3"]
    assert sorted(t.rsplit(".", 1)[1] for t in ia3) == sorted(["q_proj", "v_proj", "c_proj"] * spec.num_layers)
    assert {t for t, s in ia3.items() if s.layer.feedforward} == \
        {f"transformer.h.{i}.mlp.c_proj" for i in range(spec.num_layers)}
    assert {t for t, s in plans["ia3-kv-ff"].items() if s.layer.feedforward} == \
        {f"transformer.h.{i}.mlp.c_fc" for i in range(spec.num_layers)}
    patterns = {t.rsplit(".", 1)[1]: (s.values[f"{t}.lora_A.weight"].shape[0], s.layer.scale)
                for t, s in plans["lora-patterns"].items()}
    assert patterns == {"q_proj": (4, 2.0), "v_proj": (4, 8.0), "c_fc": (2, 4.0)}
    assert sorted({int(t.split(".")[2]) for t in plans["lora-layers"]}) == [1, 3]
    assert len(plans["lora-layers"]) == 3 * 2


# ---- PEFT -> twintune --------------------------------------------------------------------------

def _peft_configs():
    from peft import IA3Config, LoraConfig

    return {
        "dora": LoraConfig(use_dora=True, r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"v_proj": 16},
                           init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "ia3-kv-ff": IA3Config(target_modules=["k_proj", "v_proj", "c_fc"], feedforward_modules=["c_fc"],
                               init_ia3_weights=False),
        # output-scaled layers with a bias (out_proj, c_fc): the bias is scaled too
        "ia3-bias": IA3Config(target_modules=["out_proj", "c_fc", "c_proj"], feedforward_modules=["c_proj"],
                              init_ia3_weights=False),
        "lora-patterns": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"c_fc": 2},
                                    alpha_pattern={"v_proj": 32}, init_lora_weights=False),
        "lora-layers": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[0, 2],
                                  layers_pattern="h", init_lora_weights=False),
    }


FROM_PEFT = {  # case -> the recipe's method that matches the PEFT config above
    "dora": "{name: dora, r: 4, alpha: 8, target_modules: [q_proj, v_proj, c_fc], alpha_pattern: {v_proj: 16}}",
    "ia3": "{name: ia3}",
    "ia3-kv-ff": TO_PEFT["ia3-kv-ff"],
    "ia3-bias": "{name: ia3, target_modules: [out_proj, c_fc, c_proj], feedforward_modules: [c_proj]}",
    "lora-patterns": TO_PEFT["lora-patterns"],
    "lora-layers": "{name: lora, r: 4, alpha: 8, target_modules: [q_proj, v_proj, c_fc], layers_to_transform: [0, 2]}",
}
KINDS = {"dora": DoRA, "ia3": IA3, "ia3-kv-ff": IA3, "ia3-bias": IA3, "lora-patterns": LoRA, "lora-layers": LoRA}


@pytest.fixture(scope="module", params=list(FROM_PEFT))
def peft_adapter(request, tmp_path_factory, tiny):
    """One PEFT model per case, with non-trivial values, saved; with its logits, its layers as PEFT
    built them and its weights as PEFT merges them (merge_and_unload)."""
    from peft import get_peft_model

    case = request.param
    model_dir, spec, _ = tiny
    torch.manual_seed(0)
    model = get_peft_model(hf_model(model_dir), _peft_configs()[case]).eval()
    with torch.no_grad():  # init_lora_weights=False leaves the magnitude at ||W + s B A||: move it off
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    out = tmp_path_factory.mktemp(f"peft-{case}") / "adapter"
    model.save_pretrained(str(out))
    ids = _ids(spec, seed=1)
    logits = torch_logits(model, ids)
    with model.disable_adapter():
        assert _error(torch_logits(model, ids), logits) > 1e-3  # the adapter matters
    layers = _peft_layers(model)
    merged = {k: v.float().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    return case, out, ids, logits, layers, merged


def test_peft_adapter_loads_as_the_method_with_its_settings(peft_adapter, tiny):
    case, adapter_dir, _, _, peft_layers, _ = peft_adapter
    _, spec, weights = tiny
    method, state = load_adapter(adapter_dir, spec)
    expected = _recipe(FROM_PEFT[case]).method
    assert type(method) is KINDS[case]
    assert _settings(method) == _settings(expected)
    plan = method.plan(BaseModel(spec, weights), 0)
    assert _planned_layers(method, plan) == peft_layers  # the layers, ranks, scales PEFT built
    assert set(state) == set(plan.initial_values())
    for name, value in state.items():  # values are PEFT's random ones, not a fresh start
        if name.endswith(".lora_magnitude_vector"):
            layer = name.removesuffix(".lora_magnitude_vector")
            assert np.abs(value - row_norms(weights[f"{layer}.weight"])).max() > 1e-3
        elif name.endswith(".ia3_l"):
            assert np.abs(value - 1).max() > 1e-3
        else:
            assert np.abs(value).max() > 0


def test_peft_adapter_merges_as_peft_merges(peft_adapter, tiny, tmp_path):
    """method.merge folds the adapter in as PEFT's merge_and_unload does (DoRA's row norms, IA3's
    rows/columns and biases), and the written checkpoint gives PEFT's logits in transformers."""
    case, adapter_dir, ids, reference, _, peft_merged = peft_adapter
    model_dir, spec, weights = tiny
    method, state = load_adapter(adapter_dir, spec)
    merged = method.merge(BaseModel(spec, weights), state)
    assert set(merged) == set(weights)
    changed = set()
    for name, value in merged.items():
        theirs = peft_merged[name]
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max(), err_msg=name)
        if not np.array_equal(value, weights[name]):
            changed.add(name)
    adapted = {n.rsplit(".", 1)[0] for n in changed}
    assert adapted == {s.target for s in method.plan(BaseModel(spec, weights), 0).surgeries}
    if case == "ia3-bias":  # output-scaled layers with a bias had it scaled
        biased = ("attn.attention.out_proj", "mlp.c_fc")
        assert {n for n in changed if n.endswith(".bias")} == \
            {f"transformer.h.{i}.{layer}.bias" for i in range(spec.num_layers) for layer in biased}

    out = write_checkpoint(tmp_path / "merged", model_dir, merged)
    _assert_same_logits(torch_logits(hf_model(out), ids), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_adapter_gives_the_same_logits_in_twintune(backend, peft_adapter):
    case, adapter_dir, ids, reference, _, _ = peft_adapter
    run = prepare(_recipe(FROM_PEFT[case]), backend, with_data=False)
    method, state = load_adapter(adapter_dir, run.spec)
    assert _settings(method) == _settings(run.method)
    before = run.backend.logits(ids)
    run.backend.set_trainable_state(state)
    assert set(run.backend.trainable_state()) == set(state)
    _assert_same_logits(run.backend.logits(ids), reference)
    assert _error(before, reference) > 1e-3  # the adapter mattered


# ---- options twintune's DoRA/IA3 do not have ---------------------------------------------------

@pytest.fixture(scope="module")
def saved_peft_adapters(tmp_path_factory, tiny):
    """A PEFT DoRA and a PEFT IA3 adapter (PEFT's own adapter_config.json) to break one setting at a time."""
    from peft import IA3Config, LoraConfig, get_peft_model

    model_dir = tiny[0]
    dirs = {}
    for kind, config in (("dora", LoraConfig(use_dora=True, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
                         ("ia3", IA3Config())):
        dirs[kind] = tmp_path_factory.mktemp(f"refuse-{kind}") / "adapter"
        get_peft_model(hf_model(model_dir), config).save_pretrained(str(dirs[kind]))
    return dirs


REFUSALS = [  # (adapter, adapter_config.json changes, the sentence)
    ("ia3", {"fan_in_fan_out": True}, r"fan_in_fan_out=True, which twintune's IA3 does not support"),
    ("ia3", {"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\], which twintune's IA3 does not support"),
    ("ia3", {"exclude_modules": ["transformer.h.0.attn.attention.q_proj"]},
     r"exclude_modules=\['transformer\.h\.0\.attn\.attention\.q_proj'\], which twintune's IA3 does not support"),
    ("ia3", {"target_modules": 3}, r"target_modules=3; it must be a list of module names or one regex"),
    ("ia3", {"feedforward_modules": ["c_proj", "v_proj"]},  # v_proj's saved vector scales outputs, not inputs
     r"'.*h\.0\.attn\.attention\.v_proj\.ia3_l' has shape \(64, 1\) but layer .* needs \(1, 64\)"),
    ("ia3", {"target_modules": ["q_proj", "v_proj"]},
     r"feedforward_modules must be a subset of target_modules .*c_proj is not a target"),
    ("dora", {"fan_in_fan_out": True}, r"fan_in_fan_out=True \(transposed"),
    ("dora", {"bias": "all"}, r"bias='all' \(trained biases\)"),
    ("dora", {"lora_bias": True}, r"lora_bias=True \(a bias on lora_B\)"),
    ("dora", {"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] \(fully trained extra modules\)"),
    ("dora", {"layer_replication": [[0, 2], [1, 4]]},
     r"layer_replication=\[\[0, 2\], \[1, 4\]\] \(replicated layers\)"),
    ("dora", {"init_lora_weights": "pissa"}, r"init_lora_weights='pissa', which changes the base model's weights"),
    ("dora", {"use_dora": False}, r"lora_magnitude_vector' is not a LoRA lora_A/lora_B weight"),
]


@pytest.mark.parametrize("kind, changes, match", REFUSALS, ids=[f"{k}-{'-'.join(c)}" for k, c, _ in REFUSALS])
def test_peft_options_twintune_cannot_express_are_refused_by_name(saved_peft_adapters, tiny, tmp_path, kind, changes,
                                                                  match):
    directory = tmp_path / "adapter"
    shutil.copytree(saved_peft_adapters[kind], directory)
    load_adapter(directory, tiny[1])  # good before it is broken
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(TwintuneError, match=match) as info:
        load_adapter(directory, tiny[1])
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?"))
