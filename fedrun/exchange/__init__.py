"""The exchange of a round (being split into stages; see issue 11)."""

from fedrun.averaging import DEFAULT_BUCKET_BYTES, EXCHANGE_DTYPES, SyncStats, weighted_average
from fedrun.averaging import Averager as Exchange

__all__ = ["DEFAULT_BUCKET_BYTES", "EXCHANGE_DTYPES", "Exchange", "SyncStats", "weighted_average"]
