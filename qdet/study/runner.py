"""A study: rows (a config plus overrides) times seeds, every run trained once and reused,
with a progress line and an ETA. A new study is a list of :class:`StudyRow`; the tables
and plots are the tool's.

Pairing: every run of a seed has ``SEED`` = that seed, so the training batches, their order
and their augmentations are the same for every row (``QDetTrainer.build_train_loader``),
and a row with ``init`` fine-tunes the model that row trained with the same seed (its
distillation teacher is that model too). A row with ``per_seed=False`` is trained once,
with its YAML's SEED, and shared by every seed (a transformer ablation's FP model).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

from qdet.config import load_config
from qdet.engine.stages import evaluate_final, train_stages
from qdet.engine.teacher_stage import needs_teacher_stage, qfd_tap, quantized_teacher_weights


@dataclass(frozen=True)
class StudyRow:
    """One row of a study.

    ``name``: its folder and key; ``label``: the method's name in tables; ``bits``: its
    column (e.g. ``"4/4"``, ``""`` for FP); ``init``: the name of the row whose model it
    fine-tunes (same seed), or None for a model trained from the YAML's MODEL.WEIGHTS.
    """

    name: str
    label: str
    config: str
    opts: tuple[str, ...] = ()
    bits: str = ""
    init: str | None = None
    per_seed: bool = True


class Study:
    """Runs ``rows`` x ``seeds`` under ``out`` (``out/seed<k>/<row>``, or ``out/<row>``
    for rows not per seed). ``opts`` go to every run; ``run_opts(row, seed)`` may add
    overrides that do not change training (e.g. a periodic evaluation for a curve);
    ``train_fn(cfg)`` trains one run (default: QFD's two stages where needed). ``jobs`` > 1
    trains that many runs at once in worker processes sharing the CPU threads (on a small
    CPU, two one-thread runs keep the cores busy through each other's single-threaded
    parts: data loading, model building, calibration, evaluation); a run waits for the run
    it starts from and for a running run that makes the QFD teacher stage it needs.

    Not only detectors: ``add_config`` declares a project's keys (e.g. the classification
    project's), ``evaluate_fn(cfg)`` gives a finished run's metrics (default: COCO box AP
    of its ``model_final.pth``, cached) and ``headline`` = (metric key, label) is what the
    progress lines quote. ``train_fn`` and ``evaluate_fn`` run in workers: module-level
    functions."""

    def __init__(
        self,
        rows: Sequence[StudyRow],
        seeds: Sequence[int],
        out: str,
        opts: Sequence[str] = (),
        run_opts: Callable[[StudyRow, int], list[str]] | None = None,
        train_fn: Callable[[CfgNode], None] | None = None,
        tag: str = "study",
        log: Callable[[str], None] = print,
        jobs: int = 1,
        add_config: Callable[[CfgNode], object] | None = None,
        evaluate_fn: Callable[[CfgNode], dict] | None = None,
        headline: tuple[str, str] = ("AP", "box AP"),
    ):
        self.rows = {r.name: r for r in rows}
        if len(self.rows) != len(rows):
            raise ValueError("study rows need distinct names")
        for r in rows:
            if r.init is not None and r.init not in self.rows:
                raise ValueError(f"row {r.name!r} starts from {r.init!r}, which is not a row")
            if r.init is not None and not r.per_seed and self.rows[r.init].per_seed:
                raise ValueError(
                    f"row {r.name!r} is made once for every seed but starts from {r.init!r}, "
                    "which is trained per seed: make both per seed, or both once"
                )
        self.seeds, self.out, self.opts = list(seeds), out, list(opts)
        self.run_opts = run_opts or (lambda row, seed: [])
        # restart: an interrupted attempt's checkpoints are replaced (its metrics too, _timed)
        self.train_fn = train_fn or (lambda cfg: train_stages(cfg, log=self._log, restart=True))
        self.tag, self.log = tag, log
        if jobs < 1:
            raise ValueError(f"jobs={jobs} must be >= 1")
        self.jobs, self.worker_train_fn = jobs, train_fn  # a worker's must pickle
        self.add_config, self.headline = add_config, headline
        self.evaluate_fn = evaluate_fn  # None: evaluate_final (COCO AP)
        self.heartbeat_s = 60.0  # a progress line this often while workers train

    def _log(self, message: str) -> None:
        self.log(f"[{self.tag}] {message}")

    def run_dir(self, row: StudyRow, seed: int) -> str:
        if not row.per_seed:
            return os.path.join(self.out, row.name)
        return os.path.join(self.out, f"seed{seed}", row.name)

    def config(self, row: StudyRow, seed: int) -> CfgNode:
        """The run's config: the row's YAML and overrides, the study's, then the pairing.
        A run keeps its newest periodic checkpoint only (enough to resume; a study of a few
        hundred runs would otherwise fill gigabytes), unless the opts say otherwise."""
        keep_one = ["SOLVER.CHECKPOINTS_TO_KEEP", "1"]
        opts = [*keep_one, *row.opts, *self.opts, *self.run_opts(row, seed)]
        cfg = load_config(row.config, opts, self.add_config)
        cfg.OUTPUT_DIR = self.run_dir(row, seed)
        if row.per_seed:
            cfg.SEED = seed
        if row.init is not None:
            init = os.path.join(self.run_dir(self.rows[row.init], seed), "model_final.pth")
            cfg.MODEL.WEIGHTS = init
            if cfg.DISTILL.ENABLED:
                cfg.DISTILL.TEACHER_WEIGHTS = init
                # QFD's teacher stage depends on the teacher, tap, feature bits, schedule and
                # seed only: rows that agree on them share it.
                d, tap = cfg.DISTILL, qfd_tap(cfg)
                if tap is not None:
                    stage = f"teacher_stage_{row.init}_{tap}_{d.TEACHER_FEATURE_BITS}b"
                    stage += f"_{d.TEACHER_STAGE_ITERS or cfg.SOLVER.MAX_ITER // 10}it"
                    cfg.DISTILL.QUANTIZED_TEACHER_WEIGHTS = os.path.join(
                        os.path.dirname(cfg.OUTPUT_DIR), stage, "model_final.pth"
                    )
        cfg.freeze()
        return cfg

    def plan(self) -> list[tuple[StudyRow, int]]:
        """Row-major: every seed of a row before the next row (rows list their inits first)."""
        done, order = set(), []
        for row in self.rows.values():
            if row.init is not None and row.init not in done:
                raise ValueError(f"row {row.name!r} is listed before {row.init!r}, its start")
            done.add(row.name)
            seeds = self.seeds if row.per_seed else self.seeds[:1]
            order += [(row, seed) for seed in seeds]
        return order

    def run(self, train: bool = True) -> dict[str, dict[int, dict]]:
        """Train what is missing, evaluate everything (cached); row -> seed -> metrics.
        ``train=False``: only the finished runs (a report while a study is under way)."""
        plan = self.plan()
        configs = [self.config(row, seed) for row, seed in plan]
        pending = [not os.path.isfile(_final(cfg)) for cfg in configs]
        if not train:
            plan = [p for p, todo in zip(plan, pending) if not todo]
            configs = [c for c, todo in zip(configs, pending) if not todo]
            pending = [False] * len(plan)
        if self.jobs > 1 and sum(pending) > 1:
            self._train_parallel(plan, configs, pending)
        seconds_per_iter: list[float] = []
        results: dict[str, dict[int, dict]] = {row.name: {} for row in self.rows.values()}
        start = time.time()
        for i, ((row, seed), cfg) in enumerate(zip(plan, configs)):
            what = f"{i + 1}/{len(plan)} {row.name}, seed {seed}"
            if not os.path.isfile(_final(cfg)):
                left = sum(c.SOLVER.MAX_ITER for c, p in zip(configs[i:], pending[i:]) if p)
                eta = _eta(seconds_per_iter, left)
                self._log(f"{what}: training {cfg.SOLVER.MAX_ITER} it ({eta})")
                seconds = _timed(self.train_fn, cfg)
                seconds_per_iter.append(seconds / max(cfg.SOLVER.MAX_ITER, 1))
            elif not pending[i]:
                self._log(f"{what}: reusing {_final(cfg)}")
            metrics = dict((self.evaluate_fn or evaluate_final)(cfg))
            metrics["train s"] = _load_json(os.path.join(cfg.OUTPUT_DIR, "train_seconds.json"))
            metrics.update(term_shares(cfg.OUTPUT_DIR))
            for seed_ in self.seeds if not row.per_seed else [seed]:
                results[row.name][seed_] = metrics
            key, label = self.headline
            self._log(f"{what}: {label} {metrics[key]:.1f} ({time.time() - start:.0f} s so far)")
        return results

    def _train_parallel(self, plan, configs, pending) -> None:
        """Train the pending runs ``self.jobs`` at a time (each evaluated in its worker)."""
        cpu_threads = torch.get_num_threads()
        # Seed by seed (a run still waits for its start): the rows of a seed finish close
        # together, so an interrupted study leaves whole pairs to compare.
        seed_rank = {seed: k for k, seed in enumerate(self.seeds)}
        todo = sorted(
            (i for i, p in enumerate(pending) if p), key=lambda i: (seed_rank[plan[i][1]], i)
        )
        total_iters = sum(configs[i].SOLVER.MAX_ITER for i in todo)
        done_iters, start, running = 0, time.time(), {}
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        # A fresh process per run: nothing (loggers bound to the last run's log file, RNG,
        # registries) carries over from one run to the next.
        with ProcessPoolExecutor(self.jobs, context, max_tasks_per_child=1) as pool:
            while todo or running:
                starting = self._ready(plan, configs, todo, running, self.jobs - len(running))
                # A run alone gets every thread (the FP model before its fine-tunes).
                threads = max(1, cpu_threads // (len(running) + len(starting)))
                for i in starting:
                    todo.remove(i)
                    row, seed = plan[i]
                    iters = done_iters + self._running_iters(configs, running)
                    eta = _eta_parallel(iters, time.time() - start, total_iters)
                    self._log(
                        f"{i + 1}/{len(plan)} {row.name}, seed {seed}: training "
                        f"{configs[i].SOLVER.MAX_ITER} it in a worker, {threads} thread(s) "
                        f"({eta}); its log: {os.path.join(configs[i].OUTPUT_DIR, 'worker.log')}"
                    )
                    work = pool.submit(
                        _train_in_worker,
                        configs[i],
                        self.worker_train_fn,
                        self.evaluate_fn,
                        threads,
                    )
                    running[work] = i
                finished, _ = wait(running, self.heartbeat_s, FIRST_COMPLETED)
                if not finished:
                    self._log_progress(plan, configs, running, done_iters, total_iters, start)
                for future in finished:
                    i = running.pop(future)
                    future.result()  # a failed run stops the study with its error
                    done_iters += configs[i].SOLVER.MAX_ITER
                    row, seed = plan[i]
                    self._log(f"{i + 1}/{len(plan)} {row.name}, seed {seed}: trained")

    def _log_progress(self, plan, configs, running, done_iters, total_iters, start) -> None:
        """Where each running run is (its metrics.json), and the ETA from the pace so far."""
        where, iters = [], done_iters
        for i in running.values():
            at = min(_last_iteration(configs[i].OUTPUT_DIR), configs[i].SOLVER.MAX_ITER)
            iters += at
            where.append(f"{plan[i][0].name} (seed {plan[i][1]}) {at}/{configs[i].SOLVER.MAX_ITER}")
        eta = _eta_parallel(iters, time.time() - start, total_iters)
        self._log(f"training {', '.join(where)} ({eta})")

    @staticmethod
    def _running_iters(configs, running) -> int:
        return sum(
            min(_last_iteration(configs[i].OUTPUT_DIR), configs[i].SOLVER.MAX_ITER)
            for i in running.values()
        )

    def _ready(self, plan, configs, todo, running, slots: int) -> list[int]:
        """Up to ``slots`` runs whose start is trained and whose QFD teacher stage is not
        being made by a running (or an already chosen) run."""
        busy = {_stage_path(configs[i]) for i in running.values()}
        ready = []
        for i in todo:
            if len(ready) >= slots:
                break
            start_run = self._start_run(plan, configs, *plan[i])
            if start_run is not None and not os.path.isfile(_final(start_run)):
                continue
            stage = _stage_path(configs[i])
            if stage is not None and stage in busy:
                continue
            busy.add(stage)
            ready.append(i)
        return ready

    def _start_run(self, plan, configs, row: StudyRow, seed: int) -> CfgNode | None:
        if row.init is None:
            return None
        init = self.rows[row.init]
        for (r, s), cfg in zip(plan, configs):
            if r is init and (s == seed or not init.per_seed):
                return cfg
        return None


def _timed(train_fn: Callable[[CfgNode], None], cfg: CfgNode) -> float:
    """Train, and keep the wall time beside the run (a reused run reports it)."""
    # An interrupted earlier attempt is not resumed (its data order would differ); its
    # metrics, which Detectron2 appends to, must not mix into this run's curve.
    stale = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    if os.path.isfile(stale):
        os.remove(stale)
    run_start = time.time()
    train_fn(cfg)
    seconds = time.time() - run_start
    _save_json(os.path.join(cfg.OUTPUT_DIR, "train_seconds.json"), seconds)
    return seconds


def _train_in_worker(
    cfg: CfgNode,
    train_fn: Callable[[CfgNode], None] | None,
    evaluate_fn: Callable[[CfgNode], dict] | None,
    threads: int,
) -> None:
    """One run in a worker process, its output in ``OUTPUT_DIR/worker.log``; evaluated
    there too (cached for the study's table) with ``evaluate_fn``, or COCO AP after the
    default training."""
    torch.set_num_threads(threads)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)

    log = open(os.path.join(cfg.OUTPUT_DIR, "worker.log"), "w")  # noqa: SIM115
    with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        setup_logger(name="qdet")
        _timed(train_fn or (lambda c: train_stages(c, restart=True)), cfg)
        if evaluate_fn is not None:
            evaluate_fn(cfg)
        elif train_fn is None:
            evaluate_final(cfg)


def _stage_path(cfg: CfgNode) -> str | None:
    """The QFD teacher stage a run makes first, or None."""
    if not needs_teacher_stage(cfg) or os.path.isfile(quantized_teacher_weights(cfg)):
        return None
    return quantized_teacher_weights(cfg)


def _last_iteration(output_dir: str) -> int:
    """Iterations done by a running run: the last line of its metrics.json (written every
    20 iterations), 0 before the first."""
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            lines = f.read().splitlines()
        return int(json.loads(lines[-1])["iteration"]) + 1 if lines else 0
    except (OSError, ValueError, KeyError):  # not written yet, or a line being written
        return 0


SHARE_PREFIX = "share "  # a run's metrics key of a distillation term's share of the loss


def term_shares(output_dir: str) -> dict[str, float]:
    """``{"share <term>": mean over the run}`` of each distillation term's share of the
    training loss, from the ``distill_ratio/<term>`` scalars of its metrics.json (the
    lines Detectron2 writes every 20 iterations); {} without distillation or a log."""
    sums: dict[str, list[float]] = {}
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            for line in f:
                for key, value in json.loads(line).items():
                    if key.startswith("distill_ratio/"):
                        sums.setdefault(key.split("/", 1)[1], []).append(float(value))
    except (OSError, ValueError):
        return {}
    return {SHARE_PREFIX + term: statistics.mean(v) for term, v in sums.items()}


def _eta_parallel(done_iters: int, elapsed: float, total_iters: int) -> str:
    if done_iters == 0:
        return "ETA after the first iterations"
    left = max(elapsed / done_iters * (total_iters - done_iters), 0.0)
    return f"about {left / 60:.0f} min of training left"


def _final(cfg: CfgNode) -> str:
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def _eta(seconds_per_iter: list[float], iterations: int) -> str:
    if not seconds_per_iter:
        return "ETA after the first run"
    left = statistics.median(seconds_per_iter) * iterations
    return f"about {left / 60:.0f} min of training left"


def _save_json(path: str, seconds: float) -> None:
    with open(path, "w") as f:
        json.dump({"seconds": seconds}, f)


def _load_json(path: str) -> float:
    """A run's training time (a reused run keeps the time it took when trained)."""
    if not os.path.isfile(path):
        return float("nan")
    with open(path) as f:
        return float(json.load(f)["seconds"])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: Sequence[float], fmt: str = ".1f") -> str:
    """``mean ± sample std``, or the single value."""
    if len(values) == 1:
        return format(values[0], fmt)
    mean, std = mean_std(values)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def paired_differences(
    results: dict[str, dict[int, dict]], row: str, base: str, metric: str = "AP"
) -> dict[int, float]:
    """seed -> ``row``'s metric minus ``base``'s, over the seeds both have."""
    seeds = sorted(set(results[row]) & set(results[base]))
    return {s: results[row][s][metric] - results[base][s][metric] for s in seeds}
