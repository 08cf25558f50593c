"""Prompt tuning and P-tuning beyond the shared method tests: PEFT's initialisations, the hand-written
LSTM against torch.nn.LSTM, PEFT adapters both ways on both backends (PEFT returns n + T logits for
prompt methods: its last T are the text's), and PEFT options twintune cannot express refused."""

import json
import math

import numpy as np
import pytest
import torch

from model_helpers import hf_model, torch_logits
from twintune.api import load
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, method_of_adapter, save_adapter
from twintune.formats.checkpoint import load_checkpoint, load_tokenizer
from twintune.formats.safetensors_io import write_safetensors
from twintune.formats.tiny_model import builtin_model_dir
from twintune.methods import BaseModel
from twintune.methods.prompt import EMBEDDING, PromptTuning, PTuning
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
MODEL_DIR = builtin_model_dir("tiny-gpt-neo")
TEXT = "Sentiment of the news"  # 5 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def base():
    checkpoint = load_checkpoint(str(MODEL_DIR))
    spec = GPTNeoSpec.from_config(checkpoint.config)
    return BaseModel(spec, gpt_neo_weights(spec, checkpoint.weights), tokenizer=load_tokenizer(checkpoint.directory))


def _ids(length: int = 16) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 1024, (2, length)).astype(np.int32)


def _error(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# ---- initial values: PEFT's rules -----------------------------------------------------------------

def test_prompt_tuning_starts_as_peft_does(base):
    wte = base.weights["transformer.wte.weight"]
    random = PromptTuning(n=20).plan(base, 0).initial_values()[EMBEDDING]
    assert random.shape == (20, 64) and abs(random.mean()) < 0.1 and abs(random.std() - 1) < 0.1  # nn.Embedding: N(0, 1)

    sampled = PromptTuning(n=8, init="sample_vocab").plan(base, 0).initial_values()[EMBEDDING]
    rows = [int(np.flatnonzero((wte == row).all(axis=1))[0]) for row in sampled]  # each row is a token's embedding
    assert len(set(rows)) > 1

    ids = base.tokenizer.encode(TEXT).ids
    assert len(ids) == 5
    for n in (3, 12):  # cut to n, or repeated to fill n (PEFT's TEXT)
        text = PromptTuning(n=n, init="text", init_text=TEXT).plan(base, 0).initial_values()[EMBEDDING]
        np.testing.assert_array_equal(text, wte[(ids * math.ceil(n / len(ids)))[:n]])


def test_p_tuning_encoders_have_pefts_shapes_and_starts(base):
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning import PromptEncoder

    for method in (PTuning(n=5, encoder="mlp", encoder_hidden_size=32),
                   PTuning(n=5, encoder="lstm", encoder_hidden_size=16, encoder_num_layers=3, encoder_dropout=0.1)):
        values = method.plan(base, 0).initial_values()
        theirs = PromptEncoder(PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=64,
                                                   num_transformer_submodules=1, encoder_hidden_size=method.encoder_hidden_size,
                                                   encoder_num_layers=method.encoder_num_layers,
                                                   encoder_dropout=method.encoder_dropout,
                                                   encoder_reparameterization_type=method.encoder.upper()))
        assert {f"transformer.prompt.{k}": tuple(v.shape) for k, v in theirs.state_dict().items()} == \
            {k: v.shape for k, v in values.items()}
        assert abs(values[EMBEDDING].std() - 1) < 0.15  # nn.Embedding: N(0, 1)
        for name, value in values.items():  # torch's uniform starts: LSTM ±1/sqrt(h), linear ±1/sqrt(fan in)
            if ".lstm_head." in name:
                bound = 1 / math.sqrt(16)
            elif ".mlp_head." in name:
                bound = 1 / math.sqrt(values[name.replace(".bias", ".weight")].shape[1])
            else:
                continue
            assert 0.8 * bound < np.abs(value).max() <= bound, name


def test_saved_forms_plan_without_the_tokenizer_or_the_weights(base):
    bare = BaseModel(base.spec, {})
    for method in (PromptTuning(n=4, init="text", init_text=TEXT), PromptTuning(n=4, init="sample_vocab"),
                   PTuning(n=4, encoder="lstm")):
        saved = method.saved_method()
        assert saved.plan(bare, 0).initial_values()[EMBEDDING].shape == (4, 64)
        assert saved.shapes(bare) == {EMBEDDING: (4, 64)} and method.virtual_tokens == 4


# ---- the LSTM written out against torch.nn.LSTM ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_written_out_lstm_equals_torch_lstm_on_both_backends(dtype):
    import mlx.core as mx

    from twintune.backends.mlx.methods.prompt import LSTM as MLXLSTM
    from twintune.backends.torch.methods.prompt import LSTM
    from twintune.methods.prompt import lstm_direction

    torch.manual_seed(0)
    reference = torch.nn.LSTM(8, 5, num_layers=3, bidirectional=True, batch_first=True, dropout=0.2).to(dtype).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.uniform_(-0.8, 0.8)  # larger than the default start, so the gates saturate somewhere
    values = {f"lstm_head.{k}": v.detach().clone() for k, v in reference.state_dict().items()}
    ours = LSTM(values, 3, 0.2, stream=1)
    ours.load_state_dict({k.removeprefix("lstm_head."): v for k, v in values.items()}, assign=True)
    ours.eval()
    x = torch.randn(7, 8, dtype=dtype)
    with torch.no_grad():
        expected = reference(x[None])[0][0]
        got = ours(x)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    assert _error(got.numpy(), expected.numpy()) < tolerance

    exact = mx.float64 if dtype == torch.float64 else mx.float32  # mx.array alone rounds float64 to float32
    mlx_values = {k: mx.array(v.numpy(), dtype=exact) for k, v in values.items()}
    mlx_lstm = MLXLSTM(mlx_values, 3, 0.2, stream=1)
    mlx_lstm.update({k.removeprefix("lstm_head."): v for k, v in mlx_values.items()})
    mlx_lstm.eval()
    assert _error(np.array(mlx_lstm(mx.array(x.numpy(), dtype=exact))), expected.numpy()) < tolerance

    # training: the same dropout masks between layers on both backends, and they drop something
    from twintune.dropout import dropout_key, dropout_masks

    ours.train(), mlx_lstm.train()
    key = dropout_key(0, 3, 0)
    with torch.no_grad(), dropout_masks(torch.tensor(key, dtype=torch.int64)):
        dropped = ours(x)
    with dropout_masks(mx.array(key, dtype=mx.uint32)):
        mlx_dropped = np.array(mlx_lstm(mx.array(x.numpy(), dtype=exact)))
    assert _error(mlx_dropped, dropped.numpy()) < tolerance and _error(dropped.numpy(), expected.numpy()) > 1e-3

    own = {k: v.numpy().astype(np.float64) for k, v in values.items()}
    layer = x.numpy().astype(np.float64)
    for k in range(3):
        layer = np.concatenate([lstm_direction(own, layer, k, ""), lstm_direction(own, layer, k, "_reverse")], 1)
    assert _error(layer, expected.numpy()) < tolerance


# ---- PEFT -> twintune -----------------------------------------------------------------------------

def _peft_configs():
    from peft import PromptEncoderConfig, PromptTuningConfig

    prompt = dict(task_type="CAUSAL_LM", num_virtual_tokens=6)
    return {
        "random": PromptTuningConfig(**prompt),
        "sample_vocab": PromptTuningConfig(**prompt, prompt_tuning_init="SAMPLE_VOCAB"),
        "text": PromptTuningConfig(**prompt, prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT,
                                   tokenizer_name_or_path=str(MODEL_DIR)),
        "mlp": PromptEncoderConfig(**prompt, encoder_reparameterization_type="MLP", encoder_hidden_size=32),
        "lstm": PromptEncoderConfig(**prompt, encoder_reparameterization_type="LSTM", encoder_hidden_size=16,
                                    encoder_num_layers=2, encoder_dropout=0.1),
    }


FROM_PEFT = {  # case -> the method its adapter_config.json describes
    "random": PromptTuning(n=6),
    "sample_vocab": PromptTuning(n=6, init="sample_vocab"),
    "text": PromptTuning(n=6, init="text", init_text=TEXT),
    "mlp": PTuning(n=6, encoder="mlp", encoder_hidden_size=32),
    "lstm": PTuning(n=6, encoder="lstm", encoder_hidden_size=16, encoder_num_layers=2, encoder_dropout=0.1),
}


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """case -> (PEFT's saved adapter directory, PEFT's logits for the text's positions)."""
    from peft import get_peft_model

    made = {}
    for case, config in _peft_configs().items():
        torch.manual_seed(1)
        model = get_peft_model(hf_model(MODEL_DIR), config).eval()  # eval: the LSTM's dropout off when saving
        directory = tmp_path_factory.mktemp("peft") / case
        model.save_pretrained(str(directory))
        logits = torch_logits(model, _ids())
        assert logits.shape[1] == 6 + _ids().shape[1]
        made[case] = directory, logits[:, 6:]
    return made


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FROM_PEFT))
def test_a_peft_adapter_gives_pefts_logits_in_twintune(case, backend, peft_adapters):
    directory, reference = peft_adapters[case]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert method_of_adapter(config, directory) == FROM_PEFT[case]
    model = load(str(MODEL_DIR), adapter=directory, backend=backend)
    assert _error(model.logits(_ids()), reference) < (1e-6 if backend == "torch" else 1e-5)
    model.set_adapter(None)  # the virtual tokens matter
    assert _error(model.logits(_ids()), reference) > 1e-3


# ---- twintune -> PEFT -----------------------------------------------------------------------------

TO_PEFT = {  # case -> (the recipe's method, the backend it trains on)
    "random": ("{name: prompt, n: 5}", "mlx"),
    "sample_vocab": ("{name: prompt, n: 5, init: sample_vocab}", "torch"),
    "text": (f"{{name: prompt, n: 5, init: text, init_text: '{TEXT}'}}", "mlx"),
    "mlp": ("{name: ptuning, n: 5, encoder: mlp, encoder_hidden_size: 32}", "torch"),
    "lstm": ("{name: ptuning, n: 5, encoder: lstm, encoder_hidden_size: 16, encoder_dropout: 0.1}", "mlx"),
}


@pytest.mark.parametrize("case", list(TO_PEFT))
def test_a_trained_twintune_adapter_gives_its_logits_in_peft(case, tmp_path):
    from peft import PeftModel

    method, backend = TO_PEFT[case]
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                              [f"method={method}", "train.max_steps=3", "data.synthetic_size=60", "train.lr=1e-2"]),
                  backend)
    start = run.plan.initial_values()
    for step in range(3):
        train_step(run, step)
    state = run.backend.trainable_state()
    assert all(np.abs(state[k] - start[k]).max() > 1e-6 for k in state), "every value trained"
    directory = save_adapter(tmp_path / "adapter", run.method, state, str(MODEL_DIR))
    saved = run.method.saved_values(state)[EMBEDDING]

    peft_model = PeftModel.from_pretrained(hf_model(MODEL_DIR), str(directory)).eval()
    config = peft_model.peft_config["default"]
    assert (config.peft_type.value, config.num_virtual_tokens) == (run.method.peft_type, 5)
    np.testing.assert_array_equal(peft_model.prompt_encoder["default"].embedding.weight.detach().numpy(), saved)
    ours = run.backend.logits(_ids())
    assert _error(torch_logits(peft_model, _ids())[:, 5:], ours) < (1e-6 if backend == "torch" else 1e-5)

    # and back in twintune, through the public API, on the other backend too
    method, loaded = load_adapter(directory, run.spec)
    assert method == run.method.saved_method() and set(loaded) == {EMBEDDING}
    np.testing.assert_array_equal(loaded[EMBEDDING], saved)
    assert method_of_adapter(json.loads((directory / "adapter_config.json").read_text()), directory) == run.method
    other = load(str(MODEL_DIR), adapter=directory, backend="torch" if backend == "mlx" else "mlx")
    assert _error(other.logits(_ids()), ours) < 1e-5


# ---- what twintune refuses ------------------------------------------------------------------------

REFUSED = {  # adapter_config.json changes -> what the sentence names
    "seq2seq": ({"task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": 2}, "task_type 'SEQ_2_SEQ_LM'"),
    "submodules": ({"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
    "init": ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init='ZEROS'"),
    "multitask": ({"peft_type": "MULTITASK_PROMPT_TUNING"}, "'MULTITASK_PROMPT_TUNING'"),
    "encoder": ({"peft_type": "P_TUNING", "encoder_reparameterization_type": "GRU"},
                "encoder_reparameterization_type='GRU'"),
    "no tokens": ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_peft_option_twintune_cannot_express_is_refused_in_one_sentence(case, tmp_path):
    changes, named = REFUSED[case]
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 64,
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", **changes}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "adapter_model.safetensors",
                      {"prompt_embeddings": np.zeros((4, 64), np.float32)}, metadata={"format": "pt"})
    with pytest.raises(TwintuneError) as refused:
        load(str(MODEL_DIR), adapter=tmp_path, backend="torch")
    message = str(refused.value)
    assert named in message and "\n" not in message and message.count(". ") == 0 and message.endswith(".")


def test_method_settings_are_checked_with_one_sentence_each(base):
    for method, named in ((PromptTuning(init="zeros"), "'method.init' must be random, sample_vocab or text"),
                          (PromptTuning(init="text"), "needs init_text"),
                          (PromptTuning(init_text="hello"), "used only with init: text"),
                          (PTuning(encoder="gru"), "'method.encoder' must be mlp or lstm"),
                          (PTuning(encoder_num_layers=3), "shape the lstm encoder only"),
                          (PTuning(encoder="lstm", encoder_dropout=1.0), "'method.encoder_dropout' must be in [0, 1)")):
        with pytest.raises(TwintuneError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            method.validate()
    with pytest.raises(TwintuneError, match="512 positions"):
        PromptTuning(n=512).plan(base, 0)
    with pytest.raises(TwintuneError, match="cannot be merged into the base model: its virtual tokens"):
        PTuning().merge(base, {})
