"""faults.py's callbacks driven directly, in-process: the signal stop's lines and votes, the non-finite guard's
lines, and the stop-every-rank note through a fake key-value store (test_faults.py and test_fault_sync.py run the
same paths for real: signals to child processes, two DDP ranks)."""

from __future__ import annotations

import signal
import threading
from types import SimpleNamespace

import pytest
import torch

from bdh_lightning import faults
from bdh_lightning.errors import NonFiniteError, TrainingInterrupted
from bdh_lightning.faults import StopEveryRank, StopOnNonFinite, StopOnSignal, check_due, last_checkpoint_path

REMEDY = "a lower model.learning_rate, or trainer.precision bf16-mixed or 32-true"


def fake_trainer(**settings):
    saved = []
    trainer = SimpleNamespace(
        world_size=1, accumulate_grad_batches=1, global_step=5, log_every_n_steps=50, max_steps=-1, should_stop=False,
        checkpoint_callback=None, ckpt_path=None, state=SimpleNamespace(fn="fit"), is_global_zero=True, global_rank=0,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
        save_checkpoint=lambda path, weights_only=None: saved.append((path, weights_only)),
    )  # fmt: skip
    for key, value in settings.items():
        setattr(trainer, key, value)
    trainer.saved = saved
    return trainer


def distributed(monkeypatch) -> None:
    """torch.distributed available and initialised, as in a multi-process run."""
    monkeypatch.setattr(faults.dist, "is_available", lambda: True)
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: True)


@pytest.fixture
def no_checkpoint(monkeypatch):
    monkeypatch.setattr(faults, "last_good_checkpoint", lambda trainer: None)


@pytest.mark.parametrize(
    "every, max_steps, step, stop, due",
    [(5, -1, 10, False, True), (5, -1, 11, False, False), (0, -1, 100, False, True), (0, -1, 50, False, False),
     (5, 12, 12, False, True), (5, 12, 13, False, True), (5, 12, 11, False, False), (5, None, 11, False, False),
     (5, 0, 11, False, False), (5, -1, 11, True, True), (50, 1, 1, False, True)],
)  # fmt: skip
def test_the_non_finite_check_is_due_at_logging_steps_the_last_step_and_a_stop(every, max_steps, step, stop, due):
    trainer = fake_trainer(log_every_n_steps=every, max_steps=max_steps, global_step=step, should_stop=stop)
    assert check_due(trainer) is due


def test_last_checkpoint_path_is_lightnings_last_ckpt_or_none():
    assert last_checkpoint_path(fake_trainer()) is None
    callback = SimpleNamespace(dirpath="", last_model_path="", CHECKPOINT_NAME_LAST="last", FILE_EXTENSION=".ckpt")
    assert last_checkpoint_path(fake_trainer(checkpoint_callback=callback)) is None  # no folder: checkpointing off
    callback.dirpath = "runs/checkpoints"
    assert last_checkpoint_path(fake_trainer(checkpoint_callback=callback)) == "runs/checkpoints/last.ckpt"
    callback.last_model_path = "runs/checkpoints/last-v1.ckpt"
    assert last_checkpoint_path(fake_trainer(checkpoint_callback=callback)) == "runs/checkpoints/last-v1.ckpt"


def test_a_first_interrupt_says_it_will_save_and_a_sigterm_says_nothing_yet(capsys):
    stop = StopOnSignal()
    stop.request_stop(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM and capsys.readouterr().err == ""
    stop = StopOnSignal()
    stop.request_stop(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT
    assert capsys.readouterr().err == (
        "Ctrl-C: saving a checkpoint after this step (Ctrl-C again aborts without saving)\n"
    )


def test_a_second_interrupt_aborts_naming_the_last_good_checkpoint(monkeypatch):
    stop = StopOnSignal()
    stop.request_stop(signal.SIGTERM, None)
    stop.request_stop(signal.SIGTERM, None)  # a second SIGTERM: still a save after the step
    stop.trainer = fake_trainer()
    monkeypatch.setattr(faults, "last_good_checkpoint", lambda trainer: ("runs/step=3.ckpt", 3))
    with pytest.raises(TrainingInterrupted) as error:
        stop.request_stop(signal.SIGINT, None)
    assert str(error.value) == (
        "stopped by a second Ctrl-C without saving; the last good checkpoint is runs/step=3.ckpt (step 3)"
    )
    assert error.value.exit_code == 130
    monkeypatch.setattr(faults, "last_good_checkpoint", lambda trainer: None)
    with pytest.raises(TrainingInterrupted, match="without saving; this run saved no checkpoint$"):
        stop.request_stop(signal.SIGINT, None)
    monkeypatch.undo()  # the real last_good_checkpoint: it is not asked without a trainer
    fresh = StopOnSignal()  # two interrupts before training started
    fresh.request_stop(signal.SIGINT, None)
    with pytest.raises(TrainingInterrupted, match="without saving; this run saved no checkpoint$"):
        fresh.request_stop(signal.SIGINT, None)


def test_a_signal_stops_after_the_optimizer_step_with_a_checkpoint():
    callback = SimpleNamespace(dirpath="runs", last_model_path="", CHECKPOINT_NAME_LAST="last", FILE_EXTENSION=".ckpt")
    trainer = fake_trainer(accumulate_grad_batches=3, checkpoint_callback=callback)
    stop = StopOnSignal()
    stop.on_train_batch_end(trainer, None, None, None, 2)  # no signal: goes on
    stop.request_stop(signal.SIGTERM, None)
    for batch_idx in (3, 4):  # between the batches of one optimizer step: goes on
        stop.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert trainer.saved == []
    with pytest.raises(TrainingInterrupted) as error:
        stop.on_train_batch_end(trainer, None, None, None, 5)
    assert str(error.value) == ("stopped by SIGTERM after step 5; saved runs/last.ckpt; continue with --ckpt_path last")
    assert error.value.exit_code == 143 and trainer.saved == [("runs/last.ckpt", False)]


def test_a_signal_without_checkpointing_says_nothing_was_saved():
    stop = StopOnSignal()
    stop.request_stop(signal.SIGINT, None)
    with pytest.raises(TrainingInterrupted) as error:
        stop.on_train_batch_end(fake_trainer(global_step=7), None, None, None, 0)
    assert str(error.value) == "stopped by SIGINT after step 7; checkpointing is off, nothing saved"
    assert error.value.exit_code == 130


def test_a_signal_to_another_rank_stops_this_one_as_a_sigterm():
    asked = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: asked.append((decision, all)) or True)
    trainer = fake_trainer(world_size=2, strategy=strategy)
    with pytest.raises(TrainingInterrupted) as error:
        StopOnSignal().on_train_batch_end(trainer, None, None, None, 0)
    assert str(error.value).startswith("stopped by a signal to another rank after step 5;")
    assert error.value.exit_code == 143 and asked == [(False, False)]  # any rank's signal stops all


class FakeWork:
    def __init__(self, log):
        self.log = log

    def wait(self):
        self.log.append("wait")


def test_ranks_vote_over_gloo_one_step_late_and_collect_the_last_vote(monkeypatch):
    """The other rank got the signal before step 1: this rank learns it from step 1's vote, read at step 2."""
    log, others = [], [1, 1]

    def all_reduce(flag, op, group, async_op):
        assert op == faults.dist.ReduceOp.MAX and group == "gloo group" and async_op is True
        flag[0] = max(int(flag[0]), others.pop(0))
        log.append("sent")
        return FakeWork(log)

    monkeypatch.setattr(faults.dist, "all_reduce", all_reduce)
    stop = StopOnSignal()
    stop.group = "gloo group"
    trainer = fake_trainer(world_size=2)
    assert stop.stop_agreed(trainer) is False and log == ["sent"]  # no earlier vote to read
    assert stop.stop_agreed(trainer) is True
    assert log == ["sent", "wait", "sent", "wait"] and stop.vote is None  # the last vote collected before stopping
    assert stop.finish_vote() is False  # nothing in flight


def test_a_vote_of_no_signal_goes_on(monkeypatch):
    def all_reduce(flag, op, group, async_op):
        return FakeWork([])

    monkeypatch.setattr(faults.dist, "all_reduce", all_reduce)
    stop = StopOnSignal()
    stop.group = "gloo group"
    trainer = fake_trainer(world_size=2)
    assert [stop.stop_agreed(trainer) for _ in range(3)] == [False, False, False] and stop.vote is not None
    stop.on_train_end(trainer, None)
    assert stop.vote is None


def test_training_start_installs_the_handlers_and_a_gloo_group(monkeypatch):
    distributed(monkeypatch)
    made = []
    monkeypatch.setattr(faults.dist, "new_group", lambda backend: made.append(backend) or "gloo group")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    stop.signum, stop.vote = signal.SIGTERM, "old vote"
    trainer = fake_trainer(world_size=2)
    try:
        stop.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGTERM) == stop.request_stop == signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert (stop.signum, stop.vote, stop.group, made) == (None, None, "gloo group", ["gloo"])
    stop.on_train_start(trainer, None)  # a second fit: the group is kept
    signal.signal(signal.SIGTERM, before[0])
    signal.signal(signal.SIGINT, before[1])
    assert made == ["gloo"]
    monkeypatch.setattr(faults, "last_good_checkpoint", lambda asked: ("kept.ckpt", 2) if asked is trainer else None)
    stop.request_stop(signal.SIGINT, None)
    with pytest.raises(TrainingInterrupted, match=r"the last good checkpoint is kept.ckpt \(step 2\)$"):
        stop.request_stop(signal.SIGINT, None)  # the checkpoint of the trainer training started with


@pytest.mark.parametrize("error", [RuntimeError("no gloo"), ValueError("bad backend")])
def test_without_a_gloo_group_the_vote_is_lightnings_collective(monkeypatch, error):
    distributed(monkeypatch)

    def new_group(backend):
        raise error

    monkeypatch.setattr(faults.dist, "new_group", new_group)
    stop = StopOnSignal()
    thread = threading.Thread(target=stop.on_train_start, args=(fake_trainer(world_size=2), None))
    thread.start()  # off the main thread: no handlers installed (Python allows them only there)
    thread.join()
    assert stop.group is None


def test_one_process_never_makes_a_group(monkeypatch):
    distributed(monkeypatch)
    made = []
    monkeypatch.setattr(faults.dist, "new_group", lambda backend: made.append(backend) or "a group")
    stop = StopOnSignal()
    thread = threading.Thread(target=stop.on_train_start, args=(fake_trainer(), None))
    thread.start()
    thread.join()
    assert stop.group is None and made == []


def losses(guard, trainer, values):
    for step, value in enumerate(values):
        trainer.global_step = step
        guard.on_before_backward(trainer, None, torch.tensor(value))


def test_the_first_non_finite_loss_and_its_step_are_kept_on_the_device(no_checkpoint):
    guard = StopOnNonFinite()
    trainer = fake_trainer()
    losses(guard, trainer, [2.5, 1.5])
    assert guard.bad_step.item() == -1
    guard.stop_if_non_finite(trainer)  # all finite: goes on
    losses(guard, trainer, [2.5, 1.5, float("inf"), float("nan"), 1.0])
    assert (guard.bad_step.item(), guard.bad_loss.item()) == (2, float("inf"))
    from_zero = StopOnNonFinite()
    losses(from_zero, trainer, [float("nan"), float("inf"), 1.0])  # step 0 is a step like any other
    assert from_zero.bad_step.item() == 0 and from_zero.bad_loss.isnan()
    with pytest.raises(NonFiniteError) as error:
        guard.stop_if_non_finite(trainer)
    assert str(error.value) == (
        f"training loss is inf at step 2; stopped without saving; no checkpoint was saved in this run; start again "
        f"with {REMEDY}"
    )
    guard.on_train_start(trainer, None)  # a new fit forgets it
    assert guard.bad_step is None and guard.bad_loss is None


def test_a_non_finite_loss_on_another_rank_stops_this_one(no_checkpoint):
    guard = StopOnNonFinite()
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: (decision, all) == (False, False))
    with pytest.raises(NonFiniteError, match="^training loss is not finite on another rank; stopped without saving"):
        guard.stop_if_non_finite(fake_trainer(strategy=strategy))


def test_the_loss_is_read_only_when_a_check_is_due(no_checkpoint):
    guard = StopOnNonFinite()
    trainer = fake_trainer(log_every_n_steps=4, accumulate_grad_batches=3)
    losses(guard, trainer, [float("nan")])
    for step, batch_idx in ((3, 2), (4, 3), (4, 4)):  # step 3: not due; step 4: due, but between its batches
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, None, None, batch_idx)
    with pytest.raises(NonFiniteError, match="^training loss is nan at step 0;"):
        guard.on_train_batch_end(trainer, None, None, None, 5)


@pytest.mark.parametrize(
    "found, resumed, advice",
    [(("runs/step=6.ckpt", 6), None, f"the last good checkpoint is runs/step=6.ckpt (step 6); resume from it "
                                      f"(--ckpt_path) with {REMEDY}"),
     (None, "old.ckpt", f"no checkpoint was saved in this run (it resumed from old.ckpt); start again with {REMEDY}"),
     (None, None, f"no checkpoint was saved in this run; start again with {REMEDY}")],
)  # fmt: skip
def test_the_advice_names_the_last_good_checkpoint_or_what_to_do(monkeypatch, found, resumed, advice):
    monkeypatch.setattr(faults, "last_good_checkpoint", lambda trainer: found)
    assert StopOnNonFinite.advice(fake_trainer(ckpt_path=resumed)) == advice


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_never_saved(no_checkpoint, bad):
    guard = StopOnNonFinite()
    trainer = fake_trainer(global_step=9)
    weights = {"a": torch.ones(3), "steps": torch.tensor([2**40]), "empty": torch.zeros(0), "b": torch.ones(2, 2)}
    guard.on_save_checkpoint(trainer, None, {"state_dict": weights})  # all finite: saved
    weights["b"][1, 0] = bad
    with pytest.raises(NonFiniteError) as error:
        guard.on_save_checkpoint(trainer, None, {"state_dict": weights})
    assert str(error.value).startswith("the weights became NaN or infinite at step 9; not saving them; no checkpoint")


def test_a_save_inside_fit_checks_the_loss_first_and_outside_fit_does_not(no_checkpoint):
    guard = StopOnNonFinite()
    trainer = fake_trainer()
    losses(guard, trainer, [float("nan")])
    trainer.state.fn = "validate"
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"a": torch.ones(2)}})
    trainer.state.fn = "fit"
    with pytest.raises(NonFiniteError, match="^training loss is nan at step 0"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {"a": torch.ones(2)}})


class FakeStore:
    """The process group's key-value store: `check` answers from `notes`, or raises once the store is gone."""

    def __init__(self, answers=()):
        self.answers, self.notes = list(answers), {}

    def check(self, keys):
        assert keys == [StopEveryRank.KEY]
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, key):
        return self.notes[key].encode()

    def set(self, key, value):
        self.notes[key] = value


class Exited(Exception):
    pass


@pytest.fixture
def watcher(monkeypatch):
    """A StopEveryRank of rank 1 polling without waiting; os._exit raises Exited(code) instead of ending pytest."""
    monkeypatch.setattr(faults.os, "_exit", lambda code: (_ for _ in ()).throw(Exited(code)))
    stop = StopEveryRank()
    stop.POLL_SECONDS, stop.rank = 0.0, 1
    return stop


def test_a_note_from_a_failed_rank_ends_this_one_in_one_line(watcher, capsys):
    watcher.store = FakeStore([False, False, True])
    watcher.store.notes[StopEveryRank.KEY] = "rank 0 ran out of memory"
    with pytest.raises(Exited) as exited:
        watcher.watch()
    assert exited.value.args == (1,) and watcher.store.answers == []
    assert capsys.readouterr().err == "error: rank 0 ran out of memory; stopping rank 1 too\n"


def test_a_store_gone_three_looks_in_a_row_is_rank_0_stopped(watcher, capsys):
    gone = RuntimeError("DistStoreError: connection reset")
    watcher.store = FakeStore([gone, gone, False, gone, OSError("broken pipe"), gone])
    with pytest.raises(Exited):
        watcher.watch()
    assert watcher.store.answers == []  # two failures, an answer, then three in a row
    assert capsys.readouterr().err == "error: rank 0 stopped; stopping rank 1 too\n"


def test_a_rank_ending_on_its_own_is_not_ended_by_the_watcher(watcher, capsys):
    class Ending(FakeStore):
        def get(self, key):
            watcher.done.set()  # this rank's own error arrives while the note is read
            return b"rank 0 failed (ValueError)"

    watcher.store = Ending([True])
    watcher.watch()
    assert capsys.readouterr().err == ""
    watcher.watch()  # done already: returns at once


@pytest.mark.parametrize(
    "exception, note",
    [(torch.OutOfMemoryError("CUDA out of memory"), "rank 1 ran out of memory"), (ValueError("bug"), "rank 1 failed (ValueError)"),
     (TrainingInterrupted("stopped", 15), None), (NonFiniteError("nan"), None), (KeyboardInterrupt(), None)],
)  # fmt: skip
def test_a_failing_rank_leaves_a_note_unless_every_rank_stops_together(exception, note):
    stop = StopEveryRank()
    stop.store, stop.rank = FakeStore(), 1
    stop.on_exception(None, None, exception)
    assert stop.done.is_set() and stop.store.notes.get(StopEveryRank.KEY) == note


@pytest.mark.parametrize("error", [RuntimeError("DistStoreError"), ConnectionResetError("reset by peer")])
def test_a_note_to_a_gone_store_is_skipped_and_without_a_store_nothing_is_written(error):
    class Gone(FakeStore):
        def set(self, key, value):
            raise error

    stop = StopEveryRank()
    stop.store = Gone()
    stop.on_exception(None, None, ValueError("bug"))  # no second error on top of the first
    stop = StopEveryRank()
    stop.on_exception(None, None, ValueError("bug"))
    assert stop.done.is_set()


def test_the_watcher_starts_only_with_several_ranks_and_a_store(monkeypatch):
    started = []
    monkeypatch.setattr(StopEveryRank, "watch", lambda self: started.append((self.rank, threading.current_thread())))
    distributed(monkeypatch)
    monkeypatch.setattr(faults.dist.distributed_c10d, "_get_default_store", lambda: "store")
    stop = StopEveryRank()
    stop.setup(fake_trainer(world_size=1), None, "fit")
    assert started == [] and stop.store is None
    stop.done.set()
    stop.setup(fake_trainer(world_size=2, global_rank=1), None, "fit")
    for thread in threading.enumerate():
        if thread.name == "bdh-stop-every-rank":
            thread.join()
    ((rank, thread),) = started
    assert rank == 1 and stop.store == "store" and not stop.done.is_set()  # a new fit: a fresh event
    assert thread.name == "bdh-stop-every-rank" and thread.daemon  # never keeps a finished process alive
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: False)
    stop = StopEveryRank()
    stop.setup(fake_trainer(world_size=2), None, "fit")
    assert len(started) == 1 and stop.store is None
    monkeypatch.setattr(faults.dist, "is_initialized", lambda: True)

    def no_store():
        raise RuntimeError("no default store")

    monkeypatch.setattr(faults.dist.distributed_c10d, "_get_default_store", no_store)
    stop.setup(fake_trainer(world_size=2, global_rank=1), None, "fit")
    assert len(started) == 1 and stop.store is None


def test_the_end_of_training_or_teardown_stops_the_watcher():
    for end in ("on_train_end", "teardown"):
        stop = StopEveryRank()
        getattr(stop, end)(None, None, *(["fit"] if end == "teardown" else []))
        assert stop.done.is_set(), end


def test_out_of_memory_markers_and_their_kinds():
    assert faults.is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert faults.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not faults.is_out_of_memory(RuntimeError("CUDNN_STATUS_BAD_PARAM"))
    assert not faults.is_out_of_memory(OSError("out of memory"))


class FakeChild:
    """A rank Lightning's launcher started: `poll` answers from `codes` (None while running), then keeps the last."""

    def __init__(self, *codes):
        self.codes, self.killed = list(codes), False

    def poll(self):
        return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]

    def kill(self):
        self.killed = True
        raise ProcessLookupError  # gone already: the watch goes on to the next


def test_ranks_that_all_end_well_end_the_watch_quietly(monkeypatch, capsys):
    sleeps = []
    monkeypatch.setattr(faults.time, "sleep", sleeps.append)
    children = [FakeChild(None, 0), FakeChild(None, None, 0)]
    faults.RankWatch(children).run()
    assert sleeps == [faults.RankWatch.POLL_SECONDS] * 3 and capsys.readouterr().err == ""
    assert not any(child.killed for child in children)


@pytest.mark.parametrize(
    "codes, how",
    [((None, -9), "rank 2, killed by SIGKILL"), ((1,), "rank 2, exit code 1"), ((-77,), "rank 2, killed by signal 77")],
)
def test_a_rank_that_ends_badly_gets_rank_0_the_grace_then_one_line(monkeypatch, capsys, codes, how):
    sleeps = []
    monkeypatch.setattr(faults.time, "sleep", sleeps.append)
    monkeypatch.setattr(faults.os, "_exit", lambda code: (_ for _ in ()).throw(Exited(code)))
    children = [FakeChild(None, None, 0), FakeChild(*codes), FakeChild(None, None, 130)]
    with pytest.raises(Exited) as exited:
        faults.RankWatch(children).run()
    assert exited.value.args == (1,) and all(child.killed for child in children)
    assert sleeps == [faults.RankWatch.POLL_SECONDS] * len(codes) + [faults.RankWatch.GRACE_SECONDS]
    assert faults.RankWatch.GRACE_SECONDS >= 10 * faults.RankWatch.POLL_SECONDS > 0
    assert capsys.readouterr().err == (
        f"error: another process of this run stopped ({how}); see its own output for why, "
        "then resume with --ckpt_path last\n"
    )


def test_lightnings_launcher_starts_our_watch_instead_of_its_own(monkeypatch):
    from lightning.pytorch.strategies.launchers import subprocess_script

    monkeypatch.setattr(subprocess_script, "_launch_process_observer", None)
    started = []
    monkeypatch.setattr(faults.RankWatch, "start", lambda self: started.append((self.name, self.daemon, self.children)))
    faults.watch_started_ranks()
    subprocess_script._launch_process_observer((child := FakeChild(0),))
    assert started == [("bdh-rank-watch", True, [child])]
