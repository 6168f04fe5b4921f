"""What a training run does about privacy, beside the exchange's stage: the checks before any process
group starts, the stage built from the config, and DP's bookkeeping over the rounds (the accountant, its
checkpointed state, epsilon on comm.jsonl / TensorBoard / the round line, the budget stop).

Every rank keeps the same accountant (the same rounds from the same config give the same epsilon, so every
rank takes the same decision to stop); rank 0 writes its state into ``shared.pt`` and a resume broadcasts
rank 0's, so epsilon continues where the checkpoint left it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedrun import checkpoint as ckpt
from fedrun import dist
from fedrun.config import ConfigError, RunConfig
from fedrun.exchange.private import Privacy, PrivacySettings
from fedrun.output import Sink
from fedrun.privacy import require
from fedrun.privacy.accountant import Accountant
from fedrun.privacy.fixedpoint import range_from_clip
from fedrun.sections import FederationConfig

DEFAULT_SECAGG_RANGE = 1.0
"""Fixed-point range of a client's change without DP: Adam moves a parameter by about lr per step, so 1.0
covers 10^4 steps at lr 1e-4 in one round, at a quantum of 2^-30 (9.3e-10); larger values are saturated
and reported (raise federation.secagg_range)."""


def sample_size(fed: FederationConfig) -> int:
    """Clients taking part in a round: ``federation.sample_clients`` once client sampling exists (0 = all),
    else all K. The accountant composes fixed-size sampling of this many of K without replacement."""
    return int(getattr(fed, "sample_clients", 0) or 0) or fed.clients


def check_before_start(cfg: RunConfig) -> None:
    """One-line ConfigErrors before any process group starts: the optional packages, and a budget that not
    even one round fits in."""
    fed = cfg.federation
    if fed.dp:
        require("dp_accounting", "DP-FedAvg (federation.dp_clip)")
    if fed.secure_aggregation:
        require("cryptography", "secure aggregation (federation.secure_aggregation)")
    if fed.dp and fed.dp_epsilon_budget is not None:
        first = Accountant(fed.dp_delta, fed.clients, fed.dp_noise_multiplier).epsilon_after_next(sample_size(fed))
        if first > fed.dp_epsilon_budget:
            raise ConfigError(
                f"invalid federation.dp_epsilon_budget={fed.dp_epsilon_budget!r}: one round already spends "
                f"epsilon {first:.4g} at dp_delta={fed.dp_delta:g} (raise dp_noise_multiplier or the budget)"
            )


def build_privacy(fed: FederationConfig, hosted: Sequence[int], warn: Callable[[str], None]) -> Privacy | None:
    """The exchange's privacy stage, or None when DP and secure aggregation are off. With secure aggregation
    every rank takes part in the key exchange here (a collective)."""
    if not fed.dp and not fed.secure_aggregation:
        return None
    keys, value_range = None, None
    if fed.secure_aggregation:
        from fedrun.privacy.secagg import exchange_keys

        keys = exchange_keys(hosted)
        value_range = fed.secagg_range or (
            range_from_clip(fed.dp_clip, fed.dp_noise_multiplier) if fed.dp_clip else DEFAULT_SECAGG_RANGE
        )
        if fed.clients <= 2:
            warn(
                f"secure aggregation with {fed.clients} client(s): each client can subtract its own update from "
                "the sum and so learns the other's; masks protect nothing against the peer here"
            )
        elif fed.method == "usplit" and fed.clients < 4:
            warn("secure aggregation under usplit with < 4 clients: a part with a single contributor is revealed")
    return Privacy(PrivacySettings(fed.dp_clip, fed.dp_noise_multiplier, value_range), keys)


class RunPrivacy:
    """DP-FedAvg's bookkeeping over a run (and the secure-aggregation warnings of each sync)."""

    def __init__(self, fed: FederationConfig) -> None:
        self.fed = fed
        self.accountant = Accountant(fed.dp_delta, fed.clients, fed.dp_noise_multiplier) if fed.dp else None

    @classmethod
    def create(cls, fed: FederationConfig) -> RunPrivacy | None:
        return cls(fed) if fed.dp or fed.secure_aggregation else None

    def resume(self, rdir: Path | None, is_main: bool) -> None:
        """The accountant of the checkpoint resumed (rank 0 reads it, every rank gets it); fresh otherwise."""
        if self.accountant is None:
            return
        state = None
        if is_main and rdir is not None:
            state = ckpt.safe_load(ckpt.shared_file(rdir)).get("privacy")
        state = dist.broadcast_json(state, dict[str, Any] | None, what="privacy accountant")
        if state is not None:
            self.accountant.load_state_dict(state)
        elif rdir is not None:
            raise ConfigError(f"cannot resume with DP: the checkpoint {rdir} holds no accountant state")

    def stop_reason(self, rnd: int) -> str | None:
        """Why the run stops before round ``rnd`` (its epsilon would exceed the budget), or None."""
        acc, budget = self.accountant, self.fed.dp_epsilon_budget
        if acc is None or budget is None:
            return None
        after = acc.epsilon_after_next(sample_size(self.fed))
        if after <= budget:
            return None
        return (
            f"privacy budget: round {rnd} would spend epsilon {after:.4g} > federation.dp_epsilon_budget={budget:g} "
            f"(delta {self.fed.dp_delta:g}); stopped after round {rnd - 1} at epsilon {acc.epsilon:.4g}"
        )

    def after_round(self, rnd: int, privacy: Privacy | None, sink: Sink, warn: Callable[[str], None]) -> dict:
        """Compose round ``rnd``, log epsilon (TensorBoard ``privacy/epsilon``), report saturated values;
        returns the fields the round adds to comm.jsonl."""
        if privacy is not None and privacy.saturated:
            warn(
                f"round {rnd}: secure aggregation saturated {privacy.saturated} value(s) of this rank's clients at "
                f"+-{privacy.settings.value_range:g}: raise federation.secagg_range"
            )
        if self.accountant is None:
            return {}
        eps = self.accountant.step(sample_size(self.fed))
        sink.scalar("privacy/epsilon", eps, rnd)
        return {"epsilon": eps, "delta": self.fed.dp_delta}

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.accountant is None else self.accountant.state_dict()


def round_text(extra: dict) -> str:
    """What the round line adds: ' | eps 1.23' with DP."""
    return f" | eps {extra['epsilon']:.3g}" if "epsilon" in extra else ""
