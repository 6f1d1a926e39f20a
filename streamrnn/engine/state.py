"""The engine's names for state rows: :class:`StateBank` and :data:`StateSnapshot`.

The Keras executor's rows live with it (:mod:`streamrnn.executors.keras_state`); every
executor keeps its own behind :class:`~streamrnn.engine.interface.StateRows`. Import them
from here in engine-level code and tests.

Example::

    bank = StateBank(serving.state_variables())
    bank.reset([3, 5])              # slots 3 and 5 back to the initial state
    snap = bank.snapshot(3)         # list of numpy rows, one per state variable
    bank.restore(7, snap)           # slot 7 now continues where slot 3 was
"""

from __future__ import annotations

from streamrnn.engine.interface import StateSnapshot
from streamrnn.executors.keras_state import StateBank

__all__ = ["StateBank", "StateSnapshot"]
