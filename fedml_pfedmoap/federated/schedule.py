"""The round schedule every engine follows (docs/architecture.md §Round schedule).

One copy of what a round is, shared by the in-process ``Simulator`` and the FedML cross-silo aggregator (and any
later engine): who takes part (``RoundSchedule.participants``: the seeded sample, then the algorithm's
``participants`` hook), whose uploads arrive (``delivered``: the hook point for client dropout), which rounds are
evaluated (``evaluates``), and what a round's uploads add up to (``upload_summary``: bytes per participant, train
metrics gathered by name, and the DP accounting of private uploads). Nothing here imports ``algorithms/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Protocol, Sequence

import numpy as np
import torch

from ..dropout import dropped_clients
from ..privacy import round_upload_metrics
from ..seeding import derive_seed

Row = Mapping[str, Any]


class ChoosesParticipants(Protocol):
    """The algorithm hook the schedule consults (``protocol.Algorithm.participants``)."""

    def participants(self, round_idx: int, sampled: Sequence[int], num_clients: int) -> List[int]: ...


def sample_clients(num_clients: int, frac: float, seed: int, round_idx: int) -> List[int]:
    """The round's sample: ``max(1, round(frac·N))`` clients, from a private RNG of (train seed, round).

    The same seed gives the same schedule for every method and every engine.
    """
    m = max(1, int(round(frac * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "client-sampling", round_idx))
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in a payload (as sent, in their own dtype); plain scalars and ids are not counted."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def upload_bytes(upload: Mapping[str, Any]) -> int:
    """Bytes of an upload's tensors, its reported ``metrics`` left out."""
    return payload_bytes({k: v for k, v in upload.items() if k != "metrics"})


def gather_metrics(uploads: Sequence[Mapping[str, Any]]) -> Dict[str, List[float]]:
    """The numeric per-client metrics reported in uploads, gathered by name (in first-seen order)."""
    out: Dict[str, List[float]] = {}
    for u in uploads:
        for k, v in (u.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append(float(v))
    return out


def upload_summary(payloads: Sequence[Any], uploads: Sequence[Mapping[str, Any]], participants: int,
                   earlier_rounds: Sequence[Row]) -> Dict[str, float]:
    """A round's training metrics: ``participants``, ``bytes_down`` / ``bytes_up`` (mean per participant), the mean
    of each reported metric (``train_loss`` only when the clients report it: with DP it stays on the clients) and the
    busiest client's private release count so far (``dp_busiest_releases``, from ``earlier_rounds``)."""
    n = max(1, int(participants))
    out: Dict[str, float] = {"participants": int(participants),
                             "bytes_down": sum(payload_bytes(p) for p in payloads) / n,
                             "bytes_up": sum(upload_bytes(u) for u in uploads) / n}
    out.update(round_upload_metrics(gather_metrics(uploads), earlier_rounds))
    return out


@dataclass(frozen=True)
class RoundSchedule:
    """Participants, deliveries and evaluation rounds of a run of ``rounds`` rounds over ``num_clients`` clients."""

    num_clients: int
    rounds: int
    frac: float = 1.0
    seed: int = 0
    eval_every: int = 1
    dropout: float = 0.0  # train_args.client_dropout: P(a selected client's upload never arrives)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_every", max(1, int(self.eval_every)))

    def sampled(self, round_idx: int) -> List[int]:
        """The seeded sample of round ``round_idx`` (``sample_clients``)."""
        return sample_clients(self.num_clients, self.frac, self.seed, round_idx)

    def participants(self, round_idx: int, algorithm: ChoosesParticipants) -> List[int]:
        """The round's participants: the sample, passed through the algorithm's ``participants`` hook."""
        return algorithm.participants(round_idx, self.sampled(round_idx), self.num_clients)

    def dropped(self, round_idx: int, selected: Sequence[int]) -> List[int]:
        """The sorted participants of round ``round_idx`` whose upload is lost (``dropout.dropped_clients``: drawn
        from (train seed, round) alone, so every method and engine loses the same clients)."""
        return dropped_clients(self.num_clients, selected, self.dropout, self.seed, round_idx)

    def delivered(self, round_idx: int, selected: Sequence[int]) -> List[int]:
        """The participants whose uploads reach the server, in ``selected`` order (all but ``dropped``)."""
        lost = set(self.dropped(round_idx, selected))
        return [int(i) for i in selected if int(i) not in lost]

    def evaluates(self, round_idx: int) -> bool:
        """Every ``eval_every``-th round and the last one are evaluation rounds."""
        return (round_idx + 1) % self.eval_every == 0 or round_idx == self.rounds - 1

