"""The divergence check after each round: a non-finite loss or average stops every rank alike, in one line.

Once per round, not per step: a client's mean local loss is a sum over its steps (a NaN anywhere stays NaN),
and one isfinite over its parameters after the exchange catches a non-finite average. One all_gather of a
status per client lets every rank raise the same line (no rank waits for the others).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedrun.client import ClientState
from fedrun.exchange.adopt import Adopted
from fedrun.resume import gather_ints


class DivergedError(RuntimeError):
    """Training diverged (a non-finite loss or average); raised on every rank alike, the message is one line."""


_FINITE, _PARAMS, _LOSS_INF, _LOSS_NAN = 0, 1, 2, 3  # a client's status after a round, worst last


def params_finite(params: dict[str, torch.Tensor], adopted: Adopted | None, hosted: int) -> bool:
    """Whether every parameter of a client is finite: one isfinite over the flat tensor a rank's single client
    lives in (``Exchange.adopt``), else one per tensor, with one host sync either way."""
    if adopted is not None and hosted == 1:
        return bool(torch.isfinite(adopted.flat).all())
    return bool(torch.stack([torch.isfinite(t).all() for t in params.values()]).all())


def check_finite(
    rnd: int,
    num_clients: int,
    clients: Mapping[int, ClientState],
    losses: Mapping[int, float],
    adopted: Adopted | None,
    last_checkpoint: int,
) -> None:
    """DivergedError on every rank when a hosted client's mean local loss of round ``rnd`` (``losses``: the
    clients that trained), or any of its parameters after the exchange, is not finite anywhere."""
    status = [_FINITE] * num_clients
    for k, client in clients.items():
        loss = losses.get(k, 0.0)  # a client not sampled this round did not train
        if not math.isfinite(loss):
            status[k] = _LOSS_NAN if math.isnan(loss) else _LOSS_INF
        elif not params_finite(client.params, adopted, len(clients)):
            status[k] = _PARAMS
    status = [max(col) for col in zip(*gather_ints(status), strict=True)]
    if max(status) == _FINITE:
        return
    bad_loss = [k for k, s in enumerate(status) if s in (_LOSS_NAN, _LOSS_INF)]
    if bad_loss:
        k = bad_loss[0]
        what = f"client {k}'s mean local loss is {'nan' if status[k] == _LOSS_NAN else 'inf'}"
    else:
        what = f"client(s) {[k for k, s in enumerate(status) if s]} hold non-finite parameters after the exchange"
    kept = (
        f"keeps its checkpoints up to round {last_checkpoint}: lower optim.lr (--lr) and start a new "
        "run (another --name)"
        if last_checkpoint
        else "wrote no checkpoint: lower optim.lr (--lr) and start it again (the same --name starts anew)"
    )
    raise DivergedError(f"training diverged in round {rnd}: {what}; the run stops without DONE and {kept}")
