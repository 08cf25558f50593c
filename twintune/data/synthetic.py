"""A built-in, seeded, offline financial-sentiment data set in the style of financial_phrasebank.

Why it is built this way: a demo data set that a keyword lookup can solve teaches nothing about
fine-tuning. No single word decides a sentence's class: sentiment is spread over several
direction words ("rose", "climbed", "jumped", "higher", "increase", ...), each in a small share
of sentences, and their meaning flips with the metric: "profit rose" is positive but "costs
rose" is negative, "losses narrowed" is positive. Metrics and most context words occur in every
class; neutral sentences announce, describe, or state a metric without a change.
"""

from __future__ import annotations

import random

from twintune.data.examples import Example

SYNTHETIC_LABELS = ("negative", "neutral", "positive")

# ---------------------------------------------------------------------------------------------
# Vocabulary. Metrics are (phrase, unit); the last word of the phrase is its "head", and heads
# are kept few so that a model sees each head+direction pair several times in ~1000 sentences.
# ---------------------------------------------------------------------------------------------

# "level" metrics move up or down; "gap" metrics also widen or narrow.
METRICS = {
    ("level", "good"): [
        ("operating profit", "money"), ("net profit", "money"), ("pretax profit", "money"),
        ("comparable operating profit", "money"), ("net sales", "money"), ("sales", "money"),
        ("export sales", "money"), ("revenue", "money"), ("net revenue", "money"),
        ("new orders", "money"), ("net income", "money"), ("deliveries", "count"),
    ],
    ("level", "bad"): [
        ("costs", "money"), ("operating costs", "money"), ("raw material costs", "money"),
        ("personnel costs", "money"), ("financing costs", "money"), ("expenses", "money"),
        ("operating expenses", "money"), ("net debt", "money"), ("interest-bearing debt", "money"),
        ("credit losses", "money"), ("losses", "money"), ("layoffs", "count"),
    ],
    ("gap", "good"): [
        ("operating margin", "percent"), ("EBIT margin", "percent"), ("gross margin", "percent"),
        ("net interest margin", "percent"),
    ],
    ("gap", "bad"): [
        ("net loss", "money"), ("operating loss", "money"), ("pretax loss", "money"),
        ("loss", "money"),
    ],
}
VERBS = {
    ("level", "up"): ["rose", "rose", "rose", "increased", "grew"],
    ("level", "down"): ["fell", "fell", "fell", "decreased", "declined"],
    ("gap", "up"): ["widened", "widened", "increased"],
    ("gap", "down"): ["narrowed", "narrowed", "decreased"],
}
# Compound nouns ("dividend increase", "cost reduction") and adjective phrases ("higher sales").
CHANGE_TOPICS = {"good": ["dividend", "capacity", "production", "staff"], "bad": ["cost", "debt", "tax"]}
CHANGE_NOUNS = {"up": ["increase", "rise"], "down": ["cut", "reduction"]}
ADJ_HEADS = {
    "good": ["sales", "profit", "revenue", "orders", "margins"],
    "bad": ["costs", "losses", "debt", "expenses"],
}
ADJECTIVES = {"up": ["higher"], "down": ["lower"]}

NAME_ROOTS = [
    "Nordic", "Baltic", "Aurora", "Kalevi", "Lumo", "Tervola", "Saimaa", "Polar", "Harbor",
    "Karelia", "Botnia", "Aava", "Fenno", "Meri", "Ilma", "Kivi", "Rauta", "Vesi", "Lakeland",
    "Northway", "Selka", "Arctic", "Hame", "Kymi", "Pori",
]
NAME_KINDS = [
    "Steel", "Paper", "Telecom", "Systems", "Foods", "Logistics", "Energy", "Pharma", "Marine",
    "Media", "Forest", "Bank", "Technologies", "Engineering", "Retail", "Chemicals", "Software",
    "Electronics", "Cargo", "Metals",
]
NAME_FORMS = ["", "", "", " Oyj", " plc", " AB", " ASA", " Group", " Corporation"]
CURRENCIES = ["EUR", "EUR", "EUR", "EUR", "USD", "SEK", "NOK", "DKK", "GBP"]
MONEY_UNITS = ["mn", "mn", "million", "m"]
YEARS = [str(year) for year in range(2004, 2012)]
QUARTERS = ["first", "second", "third", "fourth"]
PREVIOUS = [
    "the corresponding period in {year}", "a year earlier", "the same period a year ago",
    "the previous quarter", "the year-earlier period",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
COUNTRIES = ["Finnish", "Swedish", "Norwegian", "Danish", "Estonian", "German", "Dutch"]
INDUSTRIES = [
    "steel", "paper", "telecommunications", "engineering", "food", "software", "shipping",
    "retail", "chemicals", "electronics", "forest industry", "banking",
]
SEGMENTS = ["Services", "Equipment", "Consumer", "Industrial", "Marine", "Packaging", "Solutions"]
CITIES = ["Helsinki", "Espoo", "Tampere", "Turku", "Oulu", "Stockholm", "Oslo", "Tallinn", "Vaasa"]
EXCHANGES = ["Helsinki Stock Exchange", "OMX Nordic Exchange", "Stockholm Stock Exchange", "Oslo Bors"]
ACTIVITIES = [
    "manufactures paper machines", "provides IT services to banks and insurers",
    "develops software for the telecom sector", "produces steel components for the car industry",
    "operates container terminals in the Baltic region", "makes packaging materials",
    "supplies engines for ships and power plants", "runs a chain of grocery stores",
    "designs mobile network equipment", "produces chemicals for the pulp industry",
]
COOPERATIONS = [
    "supply components for wind turbines", "develop a new logistics system",
    "deliver network equipment in Russia", "build a sawmill in Estonia",
    "provide maintenance services", "distribute its products in Germany",
]
REPORTS = [
    "interim report for January-March {year}", "half-year report for {year}",
    "financial statements for {year}", "interim report for the {quarter} quarter",
    "annual report for {year}",
]
STEADY = ["was unchanged at", "remained at", "stood at", "totalled", "amounted to"]

# Positive/negative shapes. {metric}/{verb} are adjacent in all but one, so word pairs decide.
VERB_SHAPES = [
    "{co} 's {metric} {verb} by {change} to {new} in {period} .",
    "{Metric} {verb} to {new} from {old} in {period} .",
    "In {period} , {metric} {verb} by {change} , {co} said .",
    "{Metric} of {co} {verb} by {change} to {new} in {period} .",
    "According to {co} , {metric} {verb} {change} compared with {previous} .",
    "{co} said on {weekday} that its {metric} {verb} to {new} in {period} .",
    "The company 's {metric} {verb} to {new} in {period} , compared with {old} {previous} .",
    "{co} , the {country} {industry} company , said its {metric} {verb} by {change} in {period} .",
    "{Metric} {verb} by {change} year-on-year in {period} , {co} said in its interim report .",
    "For {period} , {co} said {metric} {verb} to {new} .",
]
NOUN_SHAPES = [
    "{co} announced a {pct} % {topic} {change_noun} on {weekday} .",
    "The board of {co} proposed a {topic} {change_noun} of {pct} % for {year} .",
]
ADJ_SHAPES = [
    "{co} reported {adjective} {head} for {period} , the company said in a statement .",
    "{co} expects {adjective} {head} in {year} , chief executive {person} told reporters in {city} .",
]
NEUTRAL_SHAPES = [
    "{co} will publish its {report} on {date} .",
    "{Metric} {steady} {value} in {period} , {co} said .",
    "{co} 's {metric} {steady} {value} in {period} .",
    "{co} is a {country} company that {activity} .",
    "{co} employs about {people} people in {countries} countries .",
    "The annual general meeting of {co} will be held in {city} on {date} .",
    "{co} 's shares are listed on the {exchange} .",
    "{co} signed an agreement with {co2} to {cooperation} , the companies said .",
    "{co} did not disclose the financial terms of the deal with {co2} .",
    "The {segment} segment of {co} accounted for {pct} % of {metric} in {period} .",
]
FIRST_NAMES = ["Matti", "Anna", "Jukka", "Liisa", "Erik", "Kari", "Maria", "Pekka", "Sari", "Lars"]
LAST_NAMES = ["Virtanen", "Korhonen", "Nieminen", "Lindqvist", "Makinen", "Hansen", "Berg", "Laine"]


def synthetic_financial_sentiment(n: int = 1500, seed: int = 0) -> list[Example]:
    """Return ``n`` labelled sentences; the same seed gives the same list, classes balanced.

    Example:
        >>> data = synthetic_financial_sentiment(n=6, seed=0)
        >>> sorted(example.label for example in data)
        ['negative', 'negative', 'neutral', 'neutral', 'positive', 'positive']
    """
    rng = random.Random(seed)
    labels = _label_sequence(n)
    rng.shuffle(labels)
    # Each polar sentence gets its own pair and the twin is dropped: twins with opposite labels
    # split across train and validation would reward memorizing context over reading sentiment.
    n_pos, n_neg = labels.count("positive"), labels.count("negative")
    pairs = [_polar_pair(rng) for _ in range(n_pos + n_neg)]
    texts = {
        "positive": iter(positive for positive, _ in pairs[:n_pos]),
        "negative": iter(negative for _, negative in pairs[n_pos:]),
        "neutral": iter([_neutral_sentence(rng) for _ in range(labels.count("neutral"))]),
    }
    return [Example(text=next(texts[label]), label=label) for label in labels]


# Balanced classes, so chance is 1/3 and no class is a free win.
CLASS_SHARES = {"negative": 1 / 3, "neutral": 1 / 3, "positive": 1 / 3}


def _label_sequence(n: int) -> list[str]:
    """n labels in CLASS_SHARES proportions (largest remainder), in a fixed order."""
    exact = {label: n * share for label, share in CLASS_SHARES.items()}
    counts = {label: int(value) for label, value in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (counts[label] - exact[label], SYNTHETIC_LABELS.index(label)))
    for label in by_remainder[: n - sum(counts.values())]:
        counts[label] += 1
    return [label for label in SYNTHETIC_LABELS for _ in range(counts[label])]


def corpus_text(seed: int = 0) -> list[str]:
    """A few thousand varied sentences from every template, to train a small BPE tokenizer.

    Example:
        >>> lines = corpus_text(seed=0)
        >>> len(lines) >= 3000
        True
    """
    # A separate stream from the labelled sets, so the tokenizer does not see their exact texts.
    return [example.text for example in synthetic_financial_sentiment(n=3000, seed=10_000 + seed)]


# Share of polar pairs whose metric is bad (costs, debt, losses): there direction words mean the
# opposite. The tiny demo model fine-tuned with LoRA learns the direction words from a thousand
# sentences but not this interaction (measured: under 0.3 accuracy on these pairs even at a 0.3
# share), so the demo keeps it a small minority that caps accuracy near 0.97 rather than 0.9.
INVERTED_SHARE = 0.05
# Share of verb-shaped pairs about margins and losses that widen or narrow.
GAP_SHARE = 0.25


def _polar_pair(rng: random.Random) -> tuple[str, str]:
    """A positive and a negative sentence sharing shape, company, period, metric and context."""
    # Every shape equally likely.
    family, shape = rng.choice(
        [("verb", s) for s in VERB_SHAPES] + [("noun", s) for s in NOUN_SHAPES] + [("adj", s) for s in ADJ_SHAPES]
    )
    context = _common_slots(rng)
    kind = "gap" if rng.random() < GAP_SHARE else "level"
    # Both sentences of a pair share the metric and flip the direction. Most metrics are good
    # ("profit rose" / "profit fell"); INVERTED_SHARE of pairs use a bad metric, where the same
    # direction words mean the opposite ("costs rose" / "costs fell").
    polarity = "bad" if rng.random() < INVERTED_SHARE else "good"
    positive = {"up": polarity == "good", "polarity": polarity}
    negative = {"up": polarity == "bad", "polarity": polarity}
    shared = {"seed": rng.random(), "kind": kind}
    return (
        shape.format(**context, **_polar_slots(rng, family, **positive, **shared)),
        shape.format(**context, **_polar_slots(rng, family, **negative, **shared)),
    )


def _polar_slots(rng: random.Random, family: str, up: bool, polarity: str, kind: str, seed: float) -> dict:
    # Metric and verb are seeded per pair: the two sentences of a pair draw the same metric (or
    # verb) when they share the polarity (or direction). Numbers come from the main stream.
    direction = "up" if up else "down"
    metric_rng = random.Random(f"{seed}-{polarity}")
    verb_rng = random.Random(f"{seed}-{direction}")
    if family == "noun":
        return {
            "topic": metric_rng.choice(CHANGE_TOPICS[polarity]),
            "change_noun": verb_rng.choice(CHANGE_NOUNS[direction]),
        }
    if family == "adj":
        return {
            "head": metric_rng.choice(ADJ_HEADS[polarity]),
            "adjective": verb_rng.choice(ADJECTIVES[direction]),
        }

    metric, unit = metric_rng.choice(METRICS[(kind, polarity)])
    old = _magnitude(rng, unit)
    if unit == "percent":
        points = round(rng.uniform(0.2, 4.0), 1)
        new = old + points if up else max(old - points, 0.1)
        change_text = f"{points} percentage points"
    else:
        change = round(rng.uniform(1.5, 60.0), 1)
        new = old * (1 + change / 100) if up else old * (1 - change / 100)
        change_text = f"{change} %"
    currency, money_unit = rng.choice(CURRENCIES), rng.choice(MONEY_UNITS)
    return {
        "metric": metric,
        "Metric": metric[0].upper() + metric[1:],
        "verb": verb_rng.choice(VERBS[(kind, direction)]),
        "change": change_text,
        "old": _format(old, unit, currency, money_unit),
        "new": _format(new, unit, currency, money_unit),
    }


def _neutral_sentence(rng: random.Random) -> str:
    slots = _common_slots(rng)
    shape = rng.choice(NEUTRAL_SHAPES)
    # Neutral sentences name good and bad metrics alike, so a metric word alone says nothing.
    metric, unit = rng.choice(METRICS[rng.choice(list(METRICS))])
    while "accounted for" in shape and unit != "money":
        metric, unit = rng.choice(METRICS[rng.choice(list(METRICS))])
    slots.update(
        metric=metric,
        Metric=metric[0].upper() + metric[1:],
        steady=rng.choice(STEADY),
        value=_format(_magnitude(rng, unit), unit, rng.choice(CURRENCIES), rng.choice(MONEY_UNITS)),
        report=rng.choice(REPORTS).format(year=slots["year"], quarter=rng.choice(QUARTERS)),
        activity=rng.choice(ACTIVITIES),
        cooperation=rng.choice(COOPERATIONS),
        exchange=rng.choice(EXCHANGES),
        people=f"{rng.randrange(50, 30000):,}",
        countries=rng.randrange(2, 40),
    )
    return shape.format(**slots)


def _common_slots(rng: random.Random) -> dict:
    co, co2 = _company(rng), _company(rng)
    while co2 == co:
        co2 = _company(rng)
    year = rng.choice(YEARS)
    return {
        "co": co,
        "co2": co2,
        "year": year,
        "period": _period(rng, year),
        "previous": rng.choice(PREVIOUS).format(year=int(year) - 1),
        "weekday": rng.choice(WEEKDAYS),
        "date": f"{rng.randrange(1, 29)} {rng.choice(MONTHS)} {year}",
        "country": rng.choice(COUNTRIES),
        "industry": rng.choice(INDUSTRIES),
        "segment": rng.choice(SEGMENTS),
        "city": rng.choice(CITIES),
        "person": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "pct": rng.choice([rng.randrange(2, 40), round(rng.uniform(1.0, 40.0), 1)]),
    }


def _company(rng: random.Random) -> str:
    return f"{rng.choice(NAME_ROOTS)} {rng.choice(NAME_KINDS)}{rng.choice(NAME_FORMS)}"


def _period(rng: random.Random, year: str) -> str:
    quarter = rng.choice(QUARTERS)
    return rng.choice([
        f"the {quarter} quarter of {year}",
        f"the {quarter} quarter",
        f"January-June {year}",
        f"January-September {year}",
        f"the first half of {year}",
        year,
        f"the financial year {year}",
        "the review period",
    ])


def _magnitude(rng: random.Random, unit: str) -> float:
    if unit == "percent":
        return round(rng.uniform(1.0, 25.0), 1)
    if unit == "count":
        return float(rng.randrange(20, 5000))
    return round(rng.uniform(0.5, 400.0), 1)


def _format(value: float, unit: str, currency: str, money_unit: str) -> str:
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "count":
        return f"{int(value):,}"
    return f"{currency} {value:.1f} {money_unit}"
