"""Prompting, tokenization and batching, in numpy, shared by both backends.

Each example becomes `prompt + label word` token ids. The loss is taken only on the label
word's tokens; prediction compares the scores of each label word's first token at the
answer position. With a linear classification head (twintune/tasks.py) an example is its prompt
alone, and the one target is the class itself, scored at the last prompt token. Batches are right-padded to their own longest sequence (dynamic padding),
so padding is never attended to (attention is causal) and never counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from twintune.errors import TwintuneError


@dataclass(frozen=True)
class Prompt:
    """A prompt template and a verbalizer (one label word per class, in class order).

    Example:
        >>> p = Prompt("Sentence: {text}\\nSentiment:", {"negative": " negative", "neutral": " neutral", "positive": " positive"})
        >>> p.render("Profit rose .")
        'Sentence: Profit rose .\\nSentiment:'
    """

    template: str
    label_words: dict[str, str]

    def __post_init__(self):
        if "{text}" not in self.template:
            raise TwintuneError("prompt template must contain the placeholder {text}.")
        try:
            self.template.format(text="x")
        except (KeyError, IndexError, ValueError) as e:
            raise TwintuneError(f"prompt template has a placeholder other than {{text}} ({e}); write literal braces as {{{{ and }}}}.") from None

    @property
    def labels(self) -> list[str]:
        return list(self.label_words)

    def render(self, text: str) -> str:
        return self.template.format(text=text)


@dataclass
class Encoded:
    """One tokenized example."""

    ids: np.ndarray  # prompt then label word (with a head: the prompt alone), int32
    prompt_len: int
    label: int
    class_target: bool = False  # a head's example: the target is the class index, not label-word tokens
    # A packed row of several examples (task instruction, packing), or a conversation: which tokens are
    # targets (each example's completion; the assistant's turns), in place of "every token after the prompt".
    target_mask: np.ndarray | None = None
    # A preference pair (data/preferences.py): this row is the chosen answer, `rejected` the other;
    # a batch puts the two in adjacent rows, or with `shares_prompt` in one row: the prompt once, then
    # both answers (make_batch).
    rejected: "Encoded | None" = None
    shares_prompt: bool = False
    # The reference model's log-probability of each target token, computed once (precompute_reference).
    reference: np.ndarray | None = None
    columns: dict | None = None  # a prompt's other columns (GRPO's reward function reads them)
    # An objective's figures of a row made during training (PPO's rollout): per target, (targets,)
    # arrays; per row, numbers. make_batch gathers them into Batch.target_data and Batch.row_data.
    target_data: dict | None = None
    row_data: dict | None = None


@dataclass
class Batch:
    """A right-padded batch; positions are flat indices into input_ids.reshape(-1)."""

    input_ids: np.ndarray  # (B, T) int32
    target_positions: np.ndarray  # (N,) int32: position whose next-token logits predict targets[i]
    targets: np.ndarray  # (N,) int32
    answer_positions: np.ndarray  # (B,) int32: position predicting the first label token
    labels: np.ndarray  # (B,) int32 class index
    lengths: np.ndarray  # (B,) real tokens per row
    example_index: np.ndarray | None = None  # (B,) rows' places in the split, for evaluation
    replay: bool = False  # rows of general text replayed beside the task's (train/guards.py)
    # A process's share of a micro-batch (train/distributed.py take_rows): where its rows start in
    # the micro-batch, and how many positions narrower than the micro-batch it is padded. Dropout
    # masks index elements by their place in the micro-batch (twintune/dropout.py), so a share
    # draws one process's bits.
    first_row: int = 0
    width_pad: int = 0
    group: int = 1  # rows per example: 2 for preference pairs (chosen, rejected), which a share never splits
    reference: np.ndarray | None = None  # (N,) the reference model's log-probability of each target
    kl: float = 0.0  # KTO's z0 for this micro-batch (tasks/kto.py)
    row_data: dict = field(default_factory=dict)  # an objective's per-row arrays (GRPO's advantages), (B,) each
    columns: list | None = None  # each row's other columns (Encoded.columns)
    target_data: dict = field(default_factory=dict)  # an objective's per-target arrays (PPO's advantages), (N,) each
    # Pairs that share their prompt (make_batch): one row a pair, prompt + chosen + rejected. `positions`
    # (B, T) each token's position (every answer starts right after the prompt), `segments` (B, T) 0 on
    # the prompt (and padding), k on answer k: a token sees the prompt and its own answer only.
    # `target_answer` (N,): the answer each target scores, numbered as the rows of unshared pairs.
    positions: np.ndarray | None = None
    segments: np.ndarray | None = None
    target_answer: np.ndarray | None = None

    @property
    def rows_per_example(self) -> int:
        """Rows an example takes: 1, or a pair's 2 where it does not share its prompt."""
        return 1 if self.segments is not None else self.group

    @property
    def examples(self) -> int:
        return self.input_ids.shape[0] // self.rows_per_example

    @property
    def answers(self) -> int:
        """The answers the batch scores: its rows, or two a row where pairs share their prompts."""
        return self.examples * self.group

    def target_rows(self) -> np.ndarray:
        """(N,) the row each target is in."""
        return self.target_positions // self.input_ids.shape[1]

    def target_answers(self) -> np.ndarray:
        """(N,) the answer each target scores (chosen 2k, rejected 2k + 1 for pair k): its row, unless
        pairs share their prompts."""
        return self.target_rows() if self.target_answer is None else self.target_answer

    @property
    def n_targets(self) -> int:
        return int(self.targets.shape[0])

    @property
    def n_real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def prompt_lengths(self) -> np.ndarray:
        """(B,) int32: each row's prompt tokens (its answer position within the row, plus one)."""
        rows, width = self.input_ids.shape
        return (self.answer_positions - np.arange(rows, dtype=np.int32) * width + 1).astype(np.int32)

    def pooling_weights(self, pooling: str) -> np.ndarray:
        """(B, T) float32 weights that pool each row's hidden states into one feature vector over its
        prompt (the label word never counts): `last`, the answer position only (the last prompt token,
        where the verbalizer reads; GPT-Neo has no pad token, so it is the last real one, as
        transformers' GPTNeoForSequenceClassification takes it); `mean`, every prompt token alike."""
        rows, width = self.input_ids.shape
        lengths = self.prompt_lengths
        weights = np.zeros((rows, width), np.float32)
        if pooling == "last":
            weights[np.arange(rows), lengths - 1] = 1.0
        elif pooling == "mean":
            weights[np.arange(width)[None, :] < lengths[:, None]] = 1.0
            weights /= lengths[:, None]
        else:
            raise TwintuneError(f"pooling must be last or mean, got {pooling!r}.")
        return weights


class Encoder:
    """Tokenizes examples for one prompt and tokenizer; checks the verbalizer is usable."""

    def __init__(self, tokenizer, prompt: Prompt, max_length: int, pad_id: int = 0, method=None,
                 context: int | None = None, head: bool = False, chat: dict | None = None, share_prompts: bool = False):
        """`method` (a twintune Method) may put virtual tokens before each example, which with it
        must fit the model's `context` positions, and may need prompts of some length. With `head`
        (a linear classification head), examples are prompts alone and the label words are unused.
        `share_prompts`: the model runs a pair's prompt once for both answers (shared_prompt_batch)."""
        self.tokenizer = tokenizer
        self.share_prompts = share_prompts
        self.chat = chat  # the tokenizer's chat template (data/chat.py read_chat_template), or None
        self.prompt = prompt
        self.max_length = max_length
        self.pad_id = pad_id
        self.method = method
        self.context = context
        self.head = head
        if head:  # the head's rows are the classes: "label ids" are the class indices
            self.label_ids = [[k] for k in range(len(prompt.labels))]
            self.first_label_ids = np.arange(len(prompt.labels), dtype=np.int32)
            return
        self.label_ids = [tokenizer.encode(w, add_special_tokens=False).ids for w in prompt.label_words.values()]
        for word, ids in zip(prompt.label_words.values(), self.label_ids):
            if not ids:
                raise TwintuneError(f"label word {word!r} encodes to no tokens.")
        firsts = [ids[0] for ids in self.label_ids]
        if len(set(firsts)) != len(firsts):
            raise TwintuneError(f"label words {list(prompt.label_words.values())} must start with different tokens "
                                "so predictions can tell them apart; choose other label words.")
        self.first_label_ids = np.array(firsts, np.int32)

    def encode(self, text: str, label: str, where: str = "") -> Encoded:
        if label not in self.prompt.label_words:
            raise TwintuneError(f"label {label!r}{where} is not one of the recipe's labels {self.prompt.labels}.")
        k = self.prompt.labels.index(label)
        prompt_ids = self.tokenizer.encode(self.prompt.render(text), add_special_tokens=False).ids
        if not prompt_ids:
            raise TwintuneError(f"example{where} encodes to no tokens with its prompt; give it some text.")
        ids = prompt_ids if self.head else prompt_ids + self.label_ids[k]
        if len(ids) > self.max_length:
            raise TwintuneError(f"example{where} is {len(ids)} tokens with its prompt, longer than "
                                f"data.max_length={self.max_length}; raise it (up to the model's context) or shorten the text.")
        self.check_method_fits(len(ids), len(prompt_ids), where)
        return Encoded(np.array(ids, np.int32), len(prompt_ids), k, class_target=self.head)

    def check_method_fits(self, length: int, prompt_length: int, where: str) -> None:
        if self.method is None:
            return
        virtual = self.method.virtual_tokens
        if virtual and self.context is not None and length + virtual > self.context:
            raise TwintuneError(f"example{where} is {length} tokens with its prompt, and method {self.method.name}'s "
                                f"{virtual} virtual tokens make {length + virtual}, past the model's {self.context} "
                                "positions; use fewer virtual tokens or shorten the text.")
        problem = self.method.prompt_problem(prompt_length)
        if problem:
            raise TwintuneError(f"example{where}: {problem}.")

    def encode_all(self, examples, split: str = "") -> list[Encoded]:
        return [self.encode(e.text, e.label, f" #{i} of the {split} split" if split else "")
                for i, e in enumerate(examples)]


def make_batch(encoded: list[Encoded], pad_id: int = 0) -> Batch:
    """Right-pad to the longest row and mark where the label tokens are predicted; a preference pair
    is two adjacent rows, chosen then rejected (or one row, shared_prompt_batch)."""
    group = 2 if encoded[0].rejected is not None else 1
    if group == 2 and encoded[0].shares_prompt:
        return shared_prompt_batch(encoded, pad_id)
    if group == 2:
        encoded = [row for e in encoded for row in (e, e.rejected)]
    width = max(len(e.ids) for e in encoded)
    input_ids = np.full((len(encoded), width), pad_id, np.int32)
    target_positions, targets, answers = [], [], []
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.ids)] = e.ids
        start = row * width + e.prompt_len - 1  # logits at position t predict token t + 1
        answers.append(start)
        if e.target_mask is not None:  # logits at t - 1 predict each target token t
            for t in np.flatnonzero(e.target_mask):
                target_positions.append(row * width + t - 1)
                targets.append(e.ids[t])
            continue
        for j, token in enumerate([e.label] if e.class_target else e.ids[e.prompt_len:]):
            target_positions.append(start + j)
            targets.append(token)
    return Batch(
        input_ids=input_ids,
        target_positions=np.array(target_positions, np.int32),
        targets=np.array(targets, np.int32),
        answer_positions=np.array(answers, np.int32),
        labels=np.array([e.label for e in encoded], np.int32),
        lengths=np.array([len(e.ids) for e in encoded], np.int32),
        group=group,
        reference=(np.concatenate([e.reference for e in encoded])
                   if all(e.reference is not None for e in encoded) else None),
        columns=[e.columns for e in encoded] if any(e.columns is not None for e in encoded) else None,
        target_data=({key: np.concatenate([e.target_data[key] for e in encoded]) for key in encoded[0].target_data}
                     if encoded[0].target_data else {}),
        row_data=({key: np.array([e.row_data[key] for e in encoded]) for key in encoded[0].row_data}
                  if encoded[0].row_data else {}),
    )


def shared_prompt_batch(pairs: list[Encoded], pad_id: int = 0) -> Batch:
    """Preference pairs one row each, `prompt + chosen + rejected`, right-padded: the prompt runs once,
    not once per answer. The rejected answer's positions restart after the prompt, and its tokens do
    not see the chosen answer's (Batch.segments), so each answer's targets get what they would in a
    row of the prompt and that answer alone; the last prompt token predicts both answers' first
    tokens. Targets come in the order of unshared pairs (chosen's, then rejected's), so a
    precomputed reference and every per-target array line up with them either way."""
    rows = [np.concatenate([e.ids, e.rejected.ids[e.prompt_len:]]) for e in pairs]
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int8)
    target_positions, targets, answer = [], [], []
    for row, (e, ids) in enumerate(zip(pairs, rows)):
        prompt, chosen = e.prompt_len, len(e.ids) - e.prompt_len
        rejected = len(ids) - prompt - chosen
        input_ids[row, :len(ids)] = ids
        positions[row, :len(ids)] = np.concatenate([np.arange(prompt + chosen), prompt + np.arange(rejected)])
        segments[row, prompt:prompt + chosen], segments[row, prompt + chosen:len(ids)] = 1, 2
        for k, (start, count) in enumerate(((prompt, chosen), (prompt + chosen, rejected))):
            predictors = [prompt - 1] + list(range(start, start + count - 1))  # each target's previous token
            target_positions += [row * width + t for t in predictors]
            targets += list(ids[start:start + count])
            answer += [2 * row + k] * count
    references = [r for e in pairs for r in (e.reference, e.rejected.reference)]
    return Batch(
        input_ids=input_ids, target_positions=np.array(target_positions, np.int32), targets=np.array(targets, np.int32),
        answer_positions=np.array([row * width + e.prompt_len - 1 for row, e in enumerate(pairs)], np.int32),
        labels=np.array([e.label for e in pairs], np.int32), lengths=np.array([len(row) for row in rows], np.int32),
        group=2, reference=np.concatenate(references) if all(r is not None for r in references) else None,
        positions=positions, segments=segments, target_answer=np.array(answer, np.int32))


def batch_rows(batch: Batch) -> list[Encoded]:
    """A (single-row-group) batch's rows as Encoded again, with their per-target and per-row data:
    what make_batch of some of them rebuilds (PPO regroups its rollout's rows every epoch)."""
    owners, rows = batch.target_rows(), []
    for j in range(batch.input_ids.shape[0]):
        mine = owners == j
        rows.append(Encoded(batch.input_ids[j, :batch.lengths[j]].copy(), int(batch.prompt_lengths[j]), 0,
                            reference=None if batch.reference is None else batch.reference[mine],
                            target_data={key: values[mine] for key, values in batch.target_data.items()},
                            row_data={key: values[j] for key, values in batch.row_data.items()}))
    return rows


class TrainOrder:
    """The seeded order of training micro-batches, addressable by optimizer step (so resume is exact).

    Each epoch is a fresh permutation drawn from (seed, epoch); an optimizer step takes
    `grad_accum` consecutive micro-batches of `batch_size` examples. With `group_by_length`,
    each run of GROUP_STEPS steps' examples is sorted by length before it is cut into steps
    (whose order is then shuffled), so a batch holds sentences of similar length and little
    padding is computed; the batches stay random in which examples they mix.
    """

    GROUP_STEPS = 16

    def __init__(self, encoded: list[Encoded], batch_size: int, grad_accum: int, seed: int, pad_id: int = 0,
                 group_by_length: bool = False):
        if not encoded:
            raise TwintuneError("the training split is empty.")
        self.encoded = encoded
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.pad_id = pad_id
        self.group_by_length = group_by_length
        self.examples_per_step = batch_size * grad_accum
        self.steps_per_epoch = -(-len(encoded) // self.examples_per_step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices of one epoch, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.encoded))
        if not self.group_by_length:
            return order
        group = self.GROUP_STEPS * self.examples_per_step
        lengths = np.array([len(e.ids) for e in self.encoded])
        for start in range(0, len(order), group):
            chunk = order[start: start + group]
            order[start: start + group] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        steps = [order[s: s + self.examples_per_step] for s in range(0, len(order), self.examples_per_step)]
        return np.concatenate([steps[i] for i in rng.permutation(len(steps))])

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chosen = order[within * self.examples_per_step: (within + 1) * self.examples_per_step]
        return [make_batch([self.encoded[i] for i in chosen[s: s + self.batch_size]], self.pad_id)
                for s in range(0, len(chosen), self.batch_size)]


def eval_batches(encoded: list[Encoded], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Fixed-order batches for evaluation, sorted by length so little padding is computed."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = make_batch([encoded[i] for i in idx], pad_id)
        batch.example_index = np.array(idx, np.int64)
        batches.append(batch)
    return batches
