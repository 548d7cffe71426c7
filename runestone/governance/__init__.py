"""Keys, teams and budgets: who may call the gateway, for which models, at what rate and for how much.

Layers, bottom up: :mod:`.periods` (budget periods at UTC boundaries), :mod:`.records` (keys and teams as
data, parsed from the admin API's JSON), :mod:`.store` (the embedded SQLite store in the data directory:
keys, teams and each budget's spend, written off the event loop), :mod:`.journal` (reservations and
settlements appended to a file as they happen, so a SIGKILL loses no spend; replayed at start), :mod:`.governance` (the pipeline's
:class:`~runestone.routing.executor.Admission`: authentication lookup, allow-lists, limits and the
reserve-then-settle budget accounting, all in memory on the request path) and :mod:`.cli` (``runestone
keys|teams``). The HTTP and control-socket faces are :mod:`runestone.front.keys`.
"""

from .governance import Governance as Governance
from .periods import PERIODS as PERIODS, period_bounds as period_bounds
from .journal import SpendJournal as SpendJournal
from .records import Budget as Budget, KeyRecord as KeyRecord, Team as Team
from .store import KeyStore as KeyStore, KeyStoreError as KeyStoreError

__all__ = ["Budget", "Governance", "KeyRecord", "KeyStore", "KeyStoreError", "PERIODS", "SpendJournal", "Team",
           "period_bounds"]
