"""The paper's two steps and their chain, with a bootstrap over the ladder's runs for the uncertainty.

Step 1: task loss from size and tokens, ``L(N, D) = A / N^alpha + B / D^beta + E``, on each run's final
evaluation, minimising a Huber loss (delta 1e-3) on log residuals with L-BFGS-B from a grid of starts
(A, B, E as logs, so they stay positive). Step 2: accuracy from task loss, ``a / (1 + exp(-k (L - L0))) + b``,
least squares over the runs' intermediate evaluations (a 5-evaluation moving average, the first 10% of the
tokens dropped, the ideal point (0, 1) added), with b bounded below by the task's chance level (free above it:
a len_norm score can sit above chance at any loss) and k <= 0. The bootstrap redraws runs with replacement
and refits both steps from the full fit's parameters; a prediction chains step 1 into step 2 per draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from megolmo.errors import MegolmoConfigError
from megolmo.ladder.inputs import LadderRun
from megolmo.ladder.tasks import TASKS

HUBER_DELTA = 1e-3
WINDOW = 5
DROP_FRACTION = 0.1
STEP1_NAMES = ("A", "alpha", "B", "beta", "E")
STEP2_NAMES = ("a", "k", "L0", "b")
FIT_FORMAT = "megolmo-ladder-fit/1"


def step1_loss(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    a, alpha, b, beta, e = params
    return a / n ** alpha + b / d ** beta + e


def step2_accuracy(params: np.ndarray, loss: np.ndarray) -> np.ndarray:
    a, k, l0, b = params
    return a * expit(k * (loss - l0)) + b


def fit_step1(n: np.ndarray, d: np.ndarray, loss: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """(A, alpha, B, beta, E); from ``start`` only, else from the best of a grid of starts."""
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_a, alpha, log_b, beta, log_e = theta
        terms = np.stack([np.exp(log_a - alpha * log_n), np.exp(log_b - beta * log_d),
                          np.full_like(log_n, np.exp(log_e))])
        predicted = terms.sum(0)
        residual = np.log(predicted) - log_loss
        huber = np.where(np.abs(residual) <= HUBER_DELTA, 0.5 * residual ** 2,
                         HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
        slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / predicted
        grad = np.array([slope @ terms[0], -slope @ (terms[0] * log_n), slope @ terms[1],
                         -slope @ (terms[1] * log_d), slope @ terms[2]])
        return float(huber.sum()), grad

    if start is not None:
        starts = [_to_theta(start)]
    else:  # split the mean loss between the three terms at a few exponents
        mean, low = float(loss.mean()), float(loss.min())
        starts = [np.array([math.log(share * (mean - e)) + alpha * log_n.mean(), alpha,
                            math.log((1 - share) * (mean - e)) + beta * log_d.mean(), beta, math.log(e)])
                  for e in (0.5 * low,) for share in (0.3, 0.7) for alpha in (0.2, 0.5) for beta in (0.2, 0.5)]
    bounds = [(None, None), (0.0, 2.0), (None, None), (0.0, 2.0), (None, None)]
    best = min((minimize(objective, theta, jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12}) for theta in starts),
               key=lambda result: result.fun)
    log_a, alpha, log_b, beta, log_e = best.x
    return np.array([math.exp(log_a), alpha, math.exp(log_b), beta, math.exp(log_e)])


def _to_theta(params: np.ndarray) -> np.ndarray:
    a, alpha, b, beta, e = params
    return np.array([math.log(a), alpha, math.log(b), beta, math.log(e)])


def fit_step2(loss: np.ndarray, accuracy: np.ndarray, chance: float, start: np.ndarray | None = None) -> np.ndarray:
    """(a, k, L0, b), with b >= chance; the ideal point (0, 1) is added here."""
    loss, accuracy = np.append(loss, 0.0), np.append(accuracy, 1.0)

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, k, l0, b = params
        sigmoid = expit(k * (loss - l0))
        residual = a * sigmoid + b - accuracy
        slope = 2 * residual * a * sigmoid * (1 - sigmoid)
        return float(residual @ residual), np.array([2 * residual @ sigmoid, slope @ (loss - l0), -k * slope.sum(),
                                                     2 * residual.sum()])

    starts = [start] if start is not None else [np.array([1 - chance, k, l0, chance]) for k in (-2.0, -8.0)
                                                for l0 in np.quantile(loss[:-1], [0.25, 0.5, 0.75])]
    bounds = [(0.0, 1.0), (-100.0, 0.0), (0.0, 4 * float(loss.max())), (chance, 1.0)]
    return min((minimize(objective, np.asarray(theta, float), jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12}) for theta in starts),
               key=lambda result: result.fun).x


def step1_points(runs: list[LadderRun], task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) of each run's last evaluation that has the task's loss."""
    points = []
    for run in runs:
        kept = [(t, v) for t, v in zip(run.tokens, run.loss.get(task, [])) if not math.isnan(v)]
        if kept:
            points.append((run.n, *kept[-1]))
    n, d, loss = (np.array(column, float) for column in zip(*points)) if points else (np.empty(0),) * 3
    return n, d, loss


def step2_points(run: LadderRun, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(loss, accuracy) of a run's evaluations, each a moving average of the last 5, once past 10% of its tokens."""
    kept = [(t, lo, acc) for t, lo, acc in zip(run.tokens, run.loss.get(task, []), run.accuracy.get(task, []))
            if not (math.isnan(lo) or math.isnan(acc))]
    if not kept:
        return np.empty(0), np.empty(0)
    tokens, loss, accuracy = (np.array(column) for column in zip(*kept))
    smooth = [np.convolve(values, np.ones(WINDOW), "full")[:len(values)] / np.minimum(np.arange(1, len(values) + 1),
                                                                                     WINDOW)
              for values in (loss, accuracy)]
    keep = tokens >= DROP_FRACTION * tokens[-1]
    return smooth[0][keep], smooth[1][keep]


def pooled_step2_points(runs: list[LadderRun], task: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [step2_points(run, task) for run in runs]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


@dataclass
class TaskFit:
    step1: np.ndarray
    step2: np.ndarray | None  # None for a loss-only task (an LM set)
    chance: float | None
    draws1: np.ndarray  # bootstrap draws, one row each
    draws2: np.ndarray | None

    def predict(self, n: float, d: float) -> dict[str, float | list[float] | None]:
        """Task loss and accuracy at (N, D), with the bootstrap's standard deviation and 95% interval."""
        losses = np.array([step1_loss(p, n, d) for p in self.draws1])
        result = {"task_loss": float(step1_loss(self.step1, n, d)), **_spread("task_loss", losses)}
        if self.step2 is None:
            return {**result, "accuracy": None}
        accuracies = np.array([step2_accuracy(p, loss) for p, loss in zip(self.draws2, losses)])
        return {**result, "accuracy": float(step2_accuracy(self.step2, result["task_loss"])),
                **_spread("accuracy", accuracies)}

    def to_dict(self) -> dict:
        return {"chance": self.chance, "step1": dict(zip(STEP1_NAMES, self.step1.tolist())),
                "step2": None if self.step2 is None else dict(zip(STEP2_NAMES, self.step2.tolist())),
                "bootstrap": {"step1": self.draws1.tolist(),
                              "step2": None if self.draws2 is None else self.draws2.tolist()}}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskFit":
        step2 = data["step2"]
        return cls(np.array([data["step1"][k] for k in STEP1_NAMES]),
                   None if step2 is None else np.array([step2[k] for k in STEP2_NAMES]), data["chance"],
                   np.array(data["bootstrap"]["step1"]),
                   None if data["bootstrap"]["step2"] is None else np.array(data["bootstrap"]["step2"]))


def _spread(name: str, values: np.ndarray) -> dict[str, float | list[float]]:
    return {f"{name}_std": float(values.std()), f"{name}_ci95": np.quantile(values, [0.025, 0.975]).tolist()}


def fit_task(runs: list[LadderRun], task: str, draws: int, rng: np.random.Generator) -> TaskFit:
    n, d, loss = step1_points(runs, task)
    if len(set(n)) < 2 or len(set(d)) < 2 or len(n) < len(STEP1_NAMES):
        raise MegolmoConfigError(f"task {task}: step 1 needs at least {len(STEP1_NAMES)} runs of at least 2 sizes and "
                                 f"2 token counts; the inputs have {len(n)} run(s), {len(set(n))} size(s)")
    step1 = fit_step1(n, d, loss)
    chance = TASKS[task].chance if task in TASKS else None
    has_accuracy = chance is not None and all(task in run.accuracy for run in runs)
    step2 = fit_step2(*pooled_step2_points(runs, task), chance) if has_accuracy else None
    draws1, draws2 = [], []
    for sample in _resamples(runs, draws, rng):
        draw1 = fit_step1(*step1_points(sample, task), start=step1)
        draws1.append(draw1)
        if step2 is not None:
            draws2.append(fit_step2(*pooled_step2_points(sample, task), chance, start=step2))
    return TaskFit(step1, step2, chance, np.array(draws1).reshape(-1, 5),
                   np.array(draws2).reshape(-1, 4) if step2 is not None else None)


def _resamples(runs: list[LadderRun], draws: int, rng: np.random.Generator) -> list[list[LadderRun]]:
    """Runs drawn with replacement; a draw with a single size or a single token count is drawn again."""
    samples: list[list[LadderRun]] = []
    while len(samples) < draws:
        sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        if len({r.n for r in sample}) >= 2 and len({r.final_tokens for r in sample}) >= 2:
            samples.append(sample)
    return samples


@dataclass
class LadderFit:
    runs: list[dict]  # name, n, tokens of each input run
    tasks: dict[str, TaskFit]

    def predict(self, n: float, d: float) -> dict[str, dict]:
        return {task: fit.predict(n, d) for task, fit in self.tasks.items()}

    def to_dict(self) -> dict:
        return {"format": FIT_FORMAT, "runs": self.runs,
                "tasks": {task: fit.to_dict() for task, fit in self.tasks.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "LadderFit":
        if not isinstance(data, dict) or data.get("format") != FIT_FORMAT:
            raise MegolmoConfigError(f"{source}: not a ladder fit (written by `python -m megolmo.ladder fit`)")
        return cls(data["runs"], {task: TaskFit.from_dict(fit) for task, fit in data["tasks"].items()})


def fit_ladder(runs: list[LadderRun], draws: int = 100, seed: int = 0) -> LadderFit:
    """Both steps for every task the runs share (the eight downstream tasks and any common LM set)."""
    if draws < 2:
        raise MegolmoConfigError(f"--bootstrap {draws}: the uncertainty needs at least 2 draws")
    tasks = [task for task in runs[0].loss if all(task in run.loss for run in runs[1:])]
    if not tasks:
        raise MegolmoConfigError("the inputs share no task: every run must have the same evaluations")
    rng = np.random.default_rng(seed)
    return LadderFit([{"name": r.name, "n": r.n, "tokens": r.final_tokens} for r in runs],
                     {task: fit_task(runs, task, draws, rng) for task in tasks})


def compare_holdout(fit: LadderFit, run: LadderRun) -> dict[str, dict]:
    """A held-out run's final evaluation beside the fit's prediction at its (N, D), per task."""
    comparison = {}
    for task, prediction in fit.predict(run.n, run.final_tokens).items():
        _, _, loss = step1_points([run], task)
        if len(loss):
            accuracy = [v for v in run.accuracy.get(task, []) if not math.isnan(v)]
            comparison[task] = {"predicted": prediction, "actual": {
                "task_loss": float(loss[0]), "accuracy": accuracy[-1] if accuracy and prediction["accuracy"] is not None
                else None}}
    return comparison
