"""Zero- and few-shot prompting: the prompt is built deterministically, fits the context or says so,
runs on both backends with the same predictions, and reports as `twintune eval` does."""

import pytest

from twintune.data.shots import draw_shots, with_shots
from twintune.data.sources import load_examples
from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.evaluate import evaluate_with_shots
from twintune.train.runs import evaluate_target

DEMO = "recipes/demo-financial-sentiment.yaml"


@pytest.fixture(scope="module")
def runs():
    # the demo's data as these figures were measured on (1500 sentences: 400 of each class to train on)
    return {backend: prepare(load_recipe(DEMO, ["data.synthetic_size=1500"]), backend) for backend in ("mlx", "torch")}


def test_the_k_shot_prompt_is_drawn_with_the_seed(runs):
    prompt = runs["torch"].encoder.prompt
    train = load_examples("synthetic", synthetic_size=30, seed=1)
    assert with_shots(prompt, draw_shots(train, 1, prompt.labels, seed=0)).render("Costs fell .") == (
        "Sentence: Nordic Electronics 's gross margin widened by 1.5 percentage points to 5.4 % in the review "
        "period .\nSentiment: positive\n\n"
        "Sentence: The annual general meeting of Kalevi Engineering Oyj will be held in Vaasa on 4 March 2009 .\n"
        "Sentiment: neutral\n\n"
        "Sentence: Revenue fell by 40.1 % year-on-year in the third quarter , Tervola Electronics said in its "
        "interim report .\nSentiment: negative\n\n"
        "Sentence: Costs fell .\nSentiment:")
    shots = draw_shots(train, 3, prompt.labels, seed=0)
    assert shots == draw_shots(train, 3, prompt.labels, seed=0) != draw_shots(train, 3, prompt.labels, seed=1)
    assert sorted(s.label for s in shots) == sorted(prompt.labels * 3)


def test_braces_in_a_shot_stay_literal(runs):
    from twintune.data.examples import Example

    prompt = runs["torch"].encoder.prompt
    shot = with_shots(prompt, [Example("Sales {rose} .", "positive")])
    assert shot.render("x").startswith("Sentence: Sales {rose} .\nSentiment: positive\n\nSentence: x")


@pytest.mark.parametrize("shots", [0, 2])
def test_zero_and_few_shot_give_the_same_predictions_on_both_backends(runs, shots):
    reports = {backend: evaluate_with_shots(run, "validation", shots) for backend, run in runs.items()}
    assert reports["mlx"].predictions == reports["torch"].predictions
    assert reports["mlx"].shots == shots and reports["mlx"].shots_note is None


def test_shots_that_do_not_fit_the_context_are_fewer_with_a_note(runs):
    report = evaluate_with_shots(runs["torch"], "validation", 40)
    assert 0 < report.shots < 40
    assert report.shots_note == (f"40 shots of each class do not fit the model's 512 positions with the validation "
                                    f"split's longest sentence; {report.shots} do")


def test_too_many_shots_for_a_class_is_one_sentence(runs):
    with pytest.raises(TwintuneError, match=r"--shots 401 asks for 401 examples of each class, but the training split "
                                            r"has only 400 of class 'negative'"):
        draw_shots(runs["torch"].examples["train"], 401, runs["torch"].encoder.prompt.labels, seed=0)


def test_the_shots_report_has_the_form_of_eval():
    plain = evaluate_target(DEMO, "test", "torch")
    shots = evaluate_target(DEMO, "test", "torch", shots=1)
    assert set(shots) == set(plain) | {"shots", "shots_asked", "shots_note"}
    assert shots["examples"] == plain["examples"] == 300  # the demo's test split: 10 % of 3000


def test_not_even_one_shot_fitting_is_one_sentence(tmp_path):
    long = " ".join(["revenue"] * 150)
    rows = "".join(f"{long} {label} {i} .,{label}\n" for i in range(10) for label in ("negative", "neutral", "positive"))
    (tmp_path / "long.csv").write_text("text,label\n" + rows)
    run = prepare(load_recipe(DEMO, [f"data.source={tmp_path / 'long.csv'}", "data.validation_fraction=0.2",
                                     "data.max_length=512"]), "torch")
    with pytest.raises(TwintuneError, match=r"not even one shot of each class fits the model's 512 positions with the "
                                            r"validation split's longest sentence; use --shots 0"):
        evaluate_with_shots(run, "validation", 2)
    assert evaluate_with_shots(run, "validation", 0).shots == 0


# --- retrieved shots: the k of each class nearest to each sentence -----------------------------------

def test_the_index_gives_the_nearest_of_each_class_least_similar_first():
    import numpy as np

    from twintune.data.examples import Example
    from twintune.data.shots import ShotIndex

    train = [Example(f"s{i}", label) for i, label in enumerate(["neg", "pos", "neg", "pos", "neg"])]
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.1], [2.0, 0.2]])
    index = ShotIndex(train, features, ["neg", "pos"])
    query = np.array([3.0, 1.0])  # cosine: s0 0.949, s1 0.316, s2 0.894, s3 -0.918, s4 0.975
    assert [e.text for e in index.nearest(query, 1)] == ["s1", "s4"]
    assert [e.text for e in index.nearest(query, 2)] == ["s3", "s1", "s0", "s4"]
    assert [e.text for e in index.nearest(query, 1, exclude=4)] == ["s1", "s0"]  # never itself
    with pytest.raises(TwintuneError, match="--shots 3 asks for 3 examples of each class, but the training split "
                                            "has only 2 of class 'pos'"):
        index.nearest(query, 3)


def test_retrieved_shots_give_the_same_predictions_on_both_backends_beside_random_shots(runs, tmp_path, monkeypatch):
    from twintune.train import features as F

    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path))
    reports = {backend: evaluate_with_shots(run, "validation", 1, retrieve=True) for backend, run in runs.items()}
    assert reports["mlx"].predictions == reports["torch"].predictions
    random = evaluate_with_shots(runs["torch"], "validation", 1)
    for report in reports.values():
        assert report.retrieved and report.shots == 1
        assert report.random_shots.accuracy == random.accuracy
        assert report.random_shots.predictions == random.predictions
    assert reports["torch"].predictions != random.predictions  # other demonstrations, other answers


def test_retrieved_shots_report_as_eval_does(tmp_path, monkeypatch):
    from twintune.train import features as F
    from twintune.train.runs import evaluate_split

    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path))
    evaluation = evaluate_split(DEMO, "test", "torch", shots=1, retrieve=True)
    report = evaluation.to_dict()
    plain = evaluate_target(DEMO, "test", "torch")
    assert set(plain) <= set(report) and "predictions" not in report["random_shots"]
    text = evaluation.text()
    assert "1 shots of each class, retrieved by similarity" in text and "random shots (1 of each class" in text
    with pytest.raises(TwintuneError, match="--retrieve chooses the --shots sentences; give --shots K"):
        evaluate_target(DEMO, "test", "torch", retrieve=True)
    with pytest.raises(TwintuneError, match="give --shots 1 or more"):
        evaluate_target(DEMO, "test", "torch", shots=0, retrieve=True)
