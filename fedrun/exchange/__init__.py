"""The exchange of a round, in stages: who takes part (``weights``), each client's update (``update``), the
bucketed all-reduce of a flat layout (``layout``, ``adopt``, ``transport``) and the server update
(``server``, with the bf16 ``reference``); ``Exchange`` runs them (``exchange``)."""

from fedrun.config import EXCHANGE_DTYPES
from fedrun.exchange.exchange import DEFAULT_BUCKET_BYTES, Exchange, SyncStats
from fedrun.exchange.weights import weighted_average

__all__ = ["DEFAULT_BUCKET_BYTES", "EXCHANGE_DTYPES", "Exchange", "SyncStats", "weighted_average"]
