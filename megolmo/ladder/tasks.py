"""The eight ranked-classification (RC, 5-shot) tasks the ladder predicts, as ``olmo_eval`` labels.

Each task is the test split where it has one, else validation, as OLMo's ladder scripts pick them; MMLU is
the weighted mean of its four test categories. Task loss is bits per byte of the correct continuation
(``bpb``), accuracy is ``len_norm``; ``chance`` (1 / choices) is the floor of the step-2 sigmoid.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[tuple[str, float], ...]  # (olmo_eval label, weight); weights sum to 1
    chance: float


MMLU_WEIGHTS = {"stem": 0.215, "humanities": 0.335, "social_sciences": 0.219, "other": 0.231}

TASKS = {task.name: task for task in [
    Task("mmlu", tuple((f"mmlu_{category}_test_rc_5shot", w) for category, w in MMLU_WEIGHTS.items()), 1 / 4),
    Task("hellaswag", (("hellaswag_val_rc_5shot", 1.0),), 1 / 4),
    Task("arc_challenge", (("arc_challenge_test_rc_5shot", 1.0),), 1 / 4),
    Task("arc_easy", (("arc_easy_test_rc_5shot", 1.0),), 1 / 4),
    Task("piqa", (("piqa_val_rc_5shot", 1.0),), 1 / 2),
    Task("csqa", (("csqa_val_rc_5shot", 1.0),), 1 / 5),
    Task("socialiqa", (("socialiqa_val_rc_5shot", 1.0),), 1 / 3),
    Task("openbookqa", (("openbookqa_test_rc_5shot", 1.0),), 1 / 4),
]}


def eval_labels() -> list[str]:
    """Every ``olmo_eval`` label the ladder's runs evaluate in the loop (``eval.downstream.tasks``)."""
    return [label for task in TASKS.values() for label, _ in task.labels]
