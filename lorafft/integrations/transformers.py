"""Intruder dimensions in a transformers ``Trainer`` run: a callback that tracks, logs and journals them.

``transformers`` (the ``track`` extra) is imported here only. Usage::

    callback = IntruderCallback(every_n_steps=50)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback])
    callback.attach(trainer)   # optional: the intruder counts then reach report_to loggers (TensorBoard, W&B)
    trainer.train()            # output_dir/lorafft-trajectory.json: one checkpoint per tracked step
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from lorafft import analysis
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
    """

    def __init__(self, every_n_steps: int = 100, k: int = 10, eps=analysis.DEFAULT_EPS, include=(), exclude=(),
                 side: str = "left", on_evaluate: bool = True, report_name: str = "lorafft-trajectory.json",
                 device=None, base_cache=None):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise InputError("IntruderCallback", f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps, self.track_evaluations, self.report_name = every_n_steps, on_evaluate, report_name
        self.settings = dict(k=k, eps=eps, include=include, exclude=exclude, side=side, device=device,
                             base_cache=base_cache)
        self.tracker: Tracker | None = None
        self.journal: Journal | None = None
        self.pending: dict[str, int] = {}

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
            self.tracker = Tracker(model, **self.settings)
        path = os.path.join(args.output_dir, self.report_name)
        os.makedirs(args.output_dir, exist_ok=True)
        self.journal = _open_journal(path, self.tracker, resumed=state.global_step > 0)
        self.tracker.rows.clear()
        self.tracker.restore(list(self.journal.rows.values()))
        self.tracker.forget_after(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_track(state, control, state.global_step % self.every_n_steps == 0)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_track(state, control, False)

    def _maybe_track(self, state, control, due: bool) -> None:
        """Track now when ``due`` or when the Trainer is about to evaluate (transformers' DefaultFlowCallback, which
        runs first, has set ``control.should_evaluate``), and ask for a log at this step to carry the counts."""
        if self.tracker is None or state.global_step in self.tracker.rows:
            return
        if due or (self.track_evaluations and control.should_evaluate):
            self.pending = self._track(state.global_step)
            control.should_log = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.tracker is None or not self.track_evaluations:
            return
        if state.global_step not in self.tracker.rows:  # an evaluation outside the training loop
            self._track(state.global_step)
        if metrics is not None:
            metrics.update(intruder_metrics(self.tracker.rows[state.global_step], self.tracker.eps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.pending or logs is None:
            return
        logs.update(self.pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is None or self.journal is None:
            return
        if self.pending:  # tracked after the last log (e.g. at an evaluation): into the history at least
            state.log_history.append({**self.pending, "step": state.global_step})
            self.pending = {}
        if self.tracker.rows:
            self.tracker.report().save(os.path.join(args.output_dir, self.report_name))
        self.journal.close(remove=True)
        self.journal = None

    def _track(self, step: int) -> dict[str, int]:
        """Analyse the weights now, journal the rows, and return the logger's scalars."""
        rows = self.tracker.step(step)
        for row in rows:
            self.journal.append(row)
        return intruder_metrics(rows, self.tracker.eps)


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
    with open(path, encoding="utf-8") as handle:
        try:
            report = Report.from_dict(json.load(handle))
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(path, f"not a lorafft trajectory report: {error}") from None
    steps = [int(label.removeprefix(STEP_PREFIX)) for label in report.checkpoints]
    for row in report.rows:
        row.checkpoint = steps[row.checkpoint]
    return report.rows
