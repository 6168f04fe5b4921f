"""Privacy spent: epsilon at delta after the rounds so far, from the RDP accountant of Google's
``dp-accounting`` (the library Flower's accountant wraps), and the budget check.

One round of DP-FedAvg releases S = sum_k clip(u_k) + N(0, sigma^2 C^2) over the n clients of the round,
the same n each round and public (the config says it). Which event of ``dp-accounting`` models that, and
why:

* fixed-size sampling of m of the K clients without replacement -> ``SampledWithoutReplacementDpEvent(K,
  m, .)``. Its RDP (Wang, Balle, Kasiviswanathan 2019, Theorem 27) holds for the *replace-one* relation
  (K public: a neighbouring federation has one client's data replaced), which is also the only relation
  the library accepts it under. ``PoissonSampledDpEvent`` would model each client joining independently
  with probability m/K, a different mechanism (the round sizes vary): not what fedrun runs.
* all clients (m = K) -> the same event with m = K, which the library reduces to the Gaussian mechanism
  (q = 1). One relation for both keeps one meaning of epsilon whatever the sampling.

Under replace-one, two clipped updates differ by up to 2C, so the L2 sensitivity of S is 2C and the noise
multiplier the events carry is (sigma C) / (2C) = sigma / 2. That is conservative next to the add/remove
analysis of McMahan et al. (sensitivity C), and it is the one that matches the sampling actually used.

The state is the list of rounds composed, as plain numbers (checkpointed as JSON-able values): a resumed
run recomposes them and epsilon continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rounds:
    """``count`` rounds that each sampled ``sample`` of ``population`` clients with noise multiplier
    ``noise_multiplier`` (sigma: noise std / clip)."""

    count: int
    population: int
    sample: int
    noise_multiplier: float


def round_event(population: int, sample: int, noise_multiplier: float) -> Any:
    """The ``dp_accounting`` event of one round (module docstring): sampling m of K without replacement of
    a Gaussian with multiplier sigma / 2 (the replace-one sensitivity is 2C)."""
    import dp_accounting

    if not 1 <= sample <= population:
        raise ValueError(f"cannot sample {sample} of {population} clients")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    return dp_accounting.SampledWithoutReplacementDpEvent(population, sample, gaussian)


def rdp_accountant() -> Any:
    """A fresh RDP accountant of the replace-one relation (default orders of ``dp-accounting``)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)


class Accountant:
    """The rounds composed so far and their epsilon at ``delta``.

    Args:
        delta: the delta of the (epsilon, delta) reported.
        population: K, the clients of the federation.
        noise_multiplier: sigma.
    """

    def __init__(self, delta: float, population: int, noise_multiplier: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.delta = float(delta)
        self.population = int(population)
        self.noise_multiplier = float(noise_multiplier)
        self.history: list[Rounds] = []
        self._epsilon: float | None = 0.0

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return sum(r.count for r in self.history)

    def _with(self, history: list[Rounds], sample: int) -> list[Rounds]:
        """``history`` and one more round of ``sample`` clients (run-length: a repeated round adds 1)."""
        new = Rounds(1, self.population, sample, self.noise_multiplier)
        last = history[-1] if history else None
        if last is not None and (last.population, last.sample, last.noise_multiplier) == (
            new.population,
            new.sample,
            new.noise_multiplier,
        ):
            return [*history[:-1], Rounds(last.count + 1, last.population, last.sample, last.noise_multiplier)]
        return [*history, new]

    def _epsilon_of(self, history: list[Rounds]) -> float:
        if not history:
            return 0.0
        import dp_accounting

        acc = rdp_accountant()
        events = [
            dp_accounting.SelfComposedDpEvent(round_event(r.population, r.sample, r.noise_multiplier), r.count)
            for r in history
        ]
        acc.compose(dp_accounting.ComposedDpEvent(events))
        return float(acc.get_epsilon(self.delta))

    @property
    def epsilon(self) -> float:
        """epsilon at ``delta`` after the rounds composed so far (0 before the first)."""
        if self._epsilon is None:
            self._epsilon = self._epsilon_of(self.history)
        return self._epsilon

    def epsilon_after_next(self, sample: int) -> float:
        """epsilon if one more round sampled ``sample`` clients (the budget check, before that round)."""
        return self._epsilon_of(self._with(self.history, sample))

    def step(self, sample: int) -> float:
        """Compose one round that sampled ``sample`` clients; returns the new epsilon."""
        self.history = self._with(self.history, sample)
        self._epsilon = None
        return self.epsilon

    def state_dict(self) -> dict[str, Any]:
        """Plain values (JSON-able): the rounds composed, the delta."""
        return {
            "delta": self.delta,
            "history": [[r.count, r.population, r.sample, r.noise_multiplier] for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s values: the rounds already composed count on."""
        self.history = [Rounds(int(c), int(k), int(m), float(s)) for c, k, m, s in state["history"]]
        self._epsilon = None
