"""Intruder dimensions in a transformers ``Trainer`` run: a callback that tracks, logs and journals them.

``transformers`` (the ``track`` extra) is imported here only. Usage::

    callback = IntruderCallback(every_n_steps=50)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)   # optional: the intruder counts then reach report_to loggers (TensorBoard, W&B)
    trainer.train()            # output_dir/lorafft-trajectory.json: one checkpoint per tracked step
"""

from __future__ import annotations

import concurrent.futures
import os

from transformers import TrainerCallback

from lorafft import options
from lorafft.errors import InputError
from lorafft.journal import Journal
from lorafft.report import Report
from lorafft.tracking import STEP_PREFIX, Tracker, intruder_metrics


class IntruderCallback(TrainerCallback):
    """Track the intruder dimensions of the model a ``Trainer`` trains (:class:`lorafft.tracking.Tracker`).

    At every ``every_n_steps``-th optimizer step (and at each evaluation, unless ``on_evaluate=False``) the model's
    weights are analysed; the counts go into the Trainer's logs as ``intruders/eps=0.5`` (total) and
    ``intruders/eps=0.5/<module type>`` (e.g. ``query``), at that step. Each step's rows are appended to
    ``<output_dir>/<report_name>.journal`` at once (fsync'd, :mod:`lorafft.journal`), so a killed run keeps what it
    tracked; a run resumed with ``trainer.train(resume_from_checkpoint=...)`` continues that trajectory (steps after
    the checkpoint are tracked again). When training ends, the trajectory report is written atomically to
    ``<output_dir>/<report_name>`` (a :class:`~lorafft.report.Report` with one checkpoint per tracked step, drawn by
    ``lorafft plot``) and the journal removed. Only the main process tracks and writes.

    Logging: the counts enter the ``logs`` dict in :meth:`on_log`, so they reach ``state.log_history``
    (``trainer_state.json``) and every callback after this one. transformers puts its ``report_to`` callbacks before
    the ones passed to ``Trainer(callbacks=...)``; :meth:`attach` moves this callback ahead of them.

    Args:
        every_n_steps: track every this many optimizer steps (>= 1).
        k, eps, include, exclude, side, device, base_cache: as in :class:`~lorafft.tracking.Tracker`.
        on_evaluate: also track at each evaluation (if that step is not tracked already).
        report_name: file name of the report in ``args.output_dir``.
        background: compute the base bases, and analyse the weights copied at each tracked step (a LoRA model's
            factors only), in one worker thread while training goes on; the counts are logged at the first step
            after they are ready, with ``intruders/step`` naming the step they describe. Meant for GPU training,
            where CPU cores are idle; on a busy CPU it competes with training for the cores.
    """

    def __init__(self, every_n_steps: int = 100, k: int = options.DEFAULT_K, eps=options.DEFAULT_EPS, include=(),
                 exclude=(), side: str = "left", on_evaluate: bool = True, report_name: str = "lorafft-trajectory.json",
                 device=None, base_cache=None, background: bool = False):
        self.every_n_steps = options.positive_int(every_n_steps, "every_n_steps")
        self.track_evaluations, self.report_name = on_evaluate, report_name
        self.settings = dict(k=k, eps=eps, include=include, exclude=exclude, side=side, device=device,
                             base_cache=base_cache)
        self.background = background
        self.tracker: Tracker | None = None
        self.journal: Journal | None = None
        self.scheduled: set[int] = set()  # steps tracked or being tracked
        self.preparing: concurrent.futures.Future | None = None  # the base bases, computed in the background
        self.running: list[concurrent.futures.Future] = []  # background analyses, in step order
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: list[dict[str, int]] = []  # counts not logged yet, one entry per tracked step

    def attach(self, trainer) -> IntruderCallback:
        """Place this callback right after transformers' ``DefaultFlowCallback`` (first) in ``trainer``'s callbacks,
        adding it if needed, so that the counts it puts in the logs reach the ``report_to`` loggers. Returns self."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(1 if callbacks else 0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tracker is None:
            self.tracker = Tracker(model, **self.settings, prepare=False)
            if self.tracker.kind == "full" and state.global_step > 0:
                raise InputError(type(model).__name__, "a run resumed from a checkpoint cannot track a model without "
                                                       "PEFT adapters: its base weights (the snapshot) are gone")
            if self.background:  # the base bases, in the worker before its first analysis; errors at _collect
                self.preparing = self._submit(self.tracker.prepare)
            else:
                self.tracker.prepare()
        path = os.path.join(args.output_dir, self.report_name)
        os.makedirs(args.output_dir, exist_ok=True)
        self.journal = _open_journal(path, self.tracker, resumed=state.global_step > 0)
        self.tracker.rows.clear()
        self.tracker.restore(list(self.journal.rows.values()))
        self.tracker.forget_after(state.global_step)
        self.scheduled = set(self.tracker.rows)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_track(state, control, state.global_step % self.every_n_steps == 0)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_track(state, control, False)

    def _maybe_track(self, state, control, due: bool) -> None:
        """Track now when ``due`` or when the Trainer is about to evaluate (transformers' DefaultFlowCallback, which
        runs first, has set ``control.should_evaluate``); ask for a log at this step when counts are ready."""
        if self.tracker is None:
            return
        if state.global_step not in self.scheduled and (due or (self.track_evaluations and control.should_evaluate)):
            self._track(state.global_step)
        if self._collect(wait=False):
            control.should_log = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.tracker is None or not self.track_evaluations:
            return
        if state.global_step not in self.scheduled:  # an evaluation outside the training loop
            self._track(state.global_step)
        self._collect(wait=not self.background)
        if metrics is not None and state.global_step in self.tracker.rows:
            metrics.update(intruder_metrics(self.tracker.rows[state.global_step], self.tracker.eps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.pending or logs is None:
            return
        entry = self.pending.pop(0)  # one tracked step per log; the next log takes the next one
        logs.update(entry)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is None or self.journal is None:
            return
        self._collect(wait=True)
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        for entry in self.pending:  # ready after the last log: into the history at least
            state.log_history.append({**entry, "step": state.global_step})
        self.pending = []
        if self.tracker.rows:
            self.tracker.report().save(os.path.join(args.output_dir, self.report_name))
        self.journal.close(remove=True)
        self.journal = None

    def _track(self, step: int) -> None:
        """Copy the weights at ``step`` and analyse them now, or in the worker thread (``background``)."""
        self.scheduled.add(step)
        captured = self.tracker.capture()
        if not self.background:
            self.pending.append(self._analyse(step, captured))
            return
        self.running.append(self._submit(self._analyse, step, captured))

    def _submit(self, work, *args) -> concurrent.futures.Future:
        """Run ``work(*args)`` in the worker thread, after the work submitted before it."""
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafft-track")
        return self.executor.submit(work, *args)

    def _analyse(self, step: int, captured) -> dict[str, int]:
        """Rows of ``step`` (kept by the tracker), journaled; returns the logger's scalars."""
        rows = self.tracker.step(step, captured)
        for row in rows:
            self.journal.append(row)
        metrics = intruder_metrics(rows, self.tracker.eps)
        return {**metrics, "intruders/step": step} if self.background else metrics

    def _collect(self, *, wait: bool) -> bool:
        """Move finished background analyses' counts to ``pending`` (all of them when ``wait``; an analysis that
        failed raises here, as does the bases' computation). True when counts wait to be logged."""
        if self.preparing is not None and (wait or self.preparing.done()):
            self.preparing.result()
            self.preparing = None
        while self.running and (wait or self.running[0].done()):
            self.pending.append(self.running.pop(0).result())
        return bool(self.pending)


def _open_journal(path: str, tracker: Tracker, *, resumed: bool) -> Journal:
    """The run's journal beside the report ``path``: resumed when the run is; a resumed run whose journal is gone
    (the earlier run finished) restarts it from the report that run wrote. A fresh run refuses an old journal."""
    journal_path = path + ".journal"
    header = {"inputs": {"base": tracker.base, "tracking": True}, "options": tracker.options}
    exists = os.path.isfile(journal_path) and os.path.getsize(journal_path) > 0
    if exists and not resumed:
        raise InputError(journal_path, "the journal of an earlier training run is here: resume that run "
                                       "(trainer.train(resume_from_checkpoint=...)) or remove the file")
    journal = Journal(journal_path, header, resume=exists)
    if resumed and not exists and os.path.isfile(path):
        for row in _report_rows(path):
            journal.append(row)
    return journal


def _report_rows(path: str) -> list:
    """The rows of a trajectory report, ``checkpoint`` set back to their training step."""
    report = Report.load(path)
    steps = [int(label.removeprefix(STEP_PREFIX)) for label in report.checkpoints]
    for row in report.rows:
        row.checkpoint = steps[row.checkpoint]
    return report.rows
