"""What a run learns to do: a recipe's `task:` section, and the linear classification head.

- `classification` (the default) trains the recipe's method to classify sentences. `head:
  verbalizer` (the default) scores the label words at the answer position with the model's own
  output layer; `head: linear` puts a new (labels x width) layer, `score`, on the hidden state of
  the last real token, as transformers' GPTNeoForSequenceClassification does (GPT-Neo has no pad
  token: the last prompt token, where the verbalizer reads too). The head trains beside any
  method: `method: none` trains the head alone ("fine-tuning I"), `full` or `last_blocks` with it
  is "fine-tuning II".
- `causal_lm` trains the method on next-token prediction over unlabelled documents, packed into
  rows (tasks/causal_lm.py), scored by perplexity.
- `instruction` trains it on prompt/completion (or chat) pairs, the loss on the completion
  (tasks/instruction.py).
- `features` trains no method: the frozen model's pooled hidden states (`pooling` last or mean,
  at `layer`, counted as transformers' hidden_states: 0 the embeddings, i the output of block i,
  -1 the final normed states) are computed once per split, cached, and a logistic regression is
  fitted on them (train/features.py).

The head is one more INSERT surgery (methods/base.py), into the model's `score` slot; both
backends' `logits(h)` then give class scores instead of vocabulary scores, so the training step,
evaluation and prediction are the verbalizer's, with the classes in place of the label words.
"""

from __future__ import annotations


from twintune.keys import named_section
from twintune.tasks.classification import HEAD, Classification, check_head_labels, head_surgery, split_head, with_head
from twintune.tasks.causal_lm import CausalLM
from twintune.tasks.features import Features
from twintune.tasks.instruction import Instruction
from twintune.tasks.grpo import GRPO
from twintune.tasks.kto import KTO
from twintune.tasks.ppo import PPO
from twintune.tasks.preference import Preference
from twintune.tasks.reward import Reward
from twintune.tasks.reports import ClassificationReport, PerplexityReport, PreferenceReport, Report
from twintune.tasks.task import Generative, Labelled, Scorer, Task, TaskData

__all__ = ["TASKS", "Task", "Labelled", "Generative", "Classification", "Features", "CausalLM", "Instruction",
           "Preference", "Reward", "KTO", "GRPO", "PPO", "PreferenceReport", "task_from_dict", "TaskData", "Scorer", "Report", "ClassificationReport", "PerplexityReport", "HEAD",
           "check_head_labels", "head_surgery", "split_head", "with_head"]

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Classification, Features, CausalLM, Instruction, Reward,
                                                                 Preference, KTO, GRPO, PPO)}


def task_from_dict(raw, where: str = "task") -> Task:
    """The task a recipe's `task:` section names (a bare name is allowed), its keys checked.

    Example:
        >>> task_from_dict({"name": "classification", "head": "linear"}).linear_head
        True
    """
    return named_section(raw, TASKS, where, "task", "classification", "{name: classification, head: linear}",
                         bare_name=True)


