"""Stop signals: SIGTERM and the first Ctrl-C only set a flag; the copy of the same Ctrl-C a launcher
forwards is ignored; a second press after that aborts at once; a SIGINT the shell ignores stays
ignored. (Real runs stopped by SIGINT: tests/e2e/test_interrupt.py and the kill chain.)"""

from __future__ import annotations

import os
import signal

import pytest

from sd_train.step_signals import FORWARD_WINDOW_S, INTERRUPTED_EXIT, StepSignals, StopRequests


@pytest.fixture
def handlers():
    """The test process's own SIGINT / SIGTERM handlers, put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ctrl_c_once_forwarded_copy_ignored_second_press_aborts(handlers, capfd):
    clock, aborted = Clock(), []
    requests = StopRequests(is_main=True, abort=aborted.append, clock=clock)
    requests.arm_interrupt()
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the handler runs, no KeyboardInterrupt
    assert requests.interrupted and not requests.terminated and requests.requested()
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in capfd.readouterr().err
    clock.now += FORWARD_WINDOW_S / 10
    os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy of the same press
    assert aborted == []
    clock.now += FORWARD_WINDOW_S
    os.kill(os.getpid(), signal.SIGINT)  # the user presses again
    assert aborted == [INTERRUPTED_EXIT]
    assert "second Ctrl-C: aborting without saving" in capfd.readouterr().err


def test_sigterm_sets_the_flag_and_only_the_main_process_speaks(handlers, capfd):
    requests = StopRequests(is_main=False, abort=lambda code: None, clock=Clock())
    os.kill(os.getpid(), signal.SIGTERM)
    assert requests.terminated and not requests.interrupted
    requests.arm_interrupt()
    os.kill(os.getpid(), signal.SIGINT)
    assert requests.interrupted and capfd.readouterr().err == ""


def test_an_ignored_sigint_stays_ignored(handlers):
    """A background job or `nohup` starts with SIGINT ignored: arming must not take Ctrl-C back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    StopRequests(is_main=True, abort=lambda code: None).arm_interrupt()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_agreed_votes_are_summed_counts():
    assert StepSignals.agreed([0.0, 0.0, 0.0]).stop is False
    votes = StepSignals.agreed([0.0, 2.0, 0.0])  # two ranks got Ctrl-C
    assert votes.interrupted and votes.stop and not votes.terminated and not votes.clock_due
    votes = StepSignals.agreed([1.0, 0.0, 1.0])  # one rank got SIGTERM; rank 0's clock says save
    assert votes.terminated and votes.stop and votes.clock_due
