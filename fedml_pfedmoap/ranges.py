"""The type and range of every numeric config key and algorithm hyperparameter, in one table.

``CONFIG_RULES`` maps ``section.key`` to a ``Num`` rule and ``PARAM_RULES`` maps an algorithm hyperparameter's name
(the same meaning in every algorithm that has it) to one. ``config.from_dict`` and ``Algorithm.parse_params`` apply
them when a config is read, so a bad value fails before any training with one ``ConfigError`` naming the key and
what was expected. ``tests/test_config_ranges.py`` checks that every int/float field has a rule here. The lists of
``benchmark_args`` are checked by the grid (``benchmark_suite/grid.py``); each seed then becomes a cell's
``common_args.random_seed`` and meets its rule here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Num:
    """A number of ``kind`` (int or float) in [low, high] (``open_low``/``open_high``: strict bound).

    ``optional``: null is accepted (it means "default"/"off"). Numeric strings (``--set key=1e-3`` arrives as a
    string in YAML 1.1) are converted; booleans, NaN and infinities are rejected.
    """

    kind: type = float
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        elif self.low is not None:
            what += f" {'>' if self.open_low else '>='} {self.low:g}"
        elif self.high is not None:
            what += f" {'<' if self.open_high else '<='} {self.high:g}"
        return what + (" or null" if self.optional else "")

    def check(self, key: str, value: Any) -> Any:
        """``value`` converted to ``kind``, or a ``ConfigError`` naming ``key`` and the expected type and range."""
        if value is None and self.optional:
            return None
        fail = ConfigError(f"{key}: expected {self.describe()}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail
        try:
            number = float(value)
        except ValueError:
            raise fail from None
        if not math.isfinite(number) or (self.kind is int and not number.is_integer()):
            raise fail
        if self.low is not None and (number <= self.low if self.open_low else number < self.low):
            raise fail
        if self.high is not None and (number >= self.high if self.open_high else number > self.high):
            raise fail
        if self.kind is int:
            return int(value) if isinstance(value, int) else int(number)
        return number


@dataclass(frozen=True)
class Each:
    """A list whose every element meets ``item`` (``optional``: null accepted); errors name ``key[i]``."""

    item: Num
    optional: bool = True

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {self.item.describe()}s, got {value!r}")
        return [self.item.check(f"{key}[{i}]", v) for i, v in enumerate(value)]


INT_POS = Num(int, 1)  # counts and sizes: >= 1
INT_NONNEG = Num(int, 0)  # seeds, indices, worker counts that may be 0
POS = Num(float, 0, open_low=True)  # rates, temperatures, timeouts: > 0
NONNEG = Num(float, 0)  # weights of regularizers: >= 0
PROB = Num(float, 0, 1)  # fractions and mixing weights in [0, 1]

CONFIG_RULES: Dict[str, Num] = {
    "common_args.random_seed": INT_NONNEG,
    "common_args.data_seed": INT_NONNEG,
    "data_args.shots": Num(int, 1, optional=True),  # null: every training image of the client's classes
    "data_args.partition_alpha": POS,
    "data_args.min_size": INT_NONNEG,
    "data_args.clients_per_domain": INT_POS,
    "data_args.num_workers": INT_NONNEG,
    "model_args.n_ctx": INT_POS,
    "train_args.client_num_in_total": INT_POS,
    "train_args.client_num_per_round": INT_POS,
    "train_args.comm_round": INT_POS,
    "train_args.epochs": INT_POS,
    "train_args.batch_size": INT_POS,
    "train_args.eval_every": INT_POS,
    "train_args.eval_batch_size": INT_POS,
    "train_args.train_clients_per_call": INT_POS,
    "train_args.client_dropout": Num(float, 0, 1, open_high=True),
    "data_args.val_fraction": Num(float, 0, 1, open_high=True),
    "device_args.num_threads": Num(int, 1, optional=True),
    "device_args.worker_num": Num(int, 1, optional=True),
    "device_args.gpu_id": INT_NONNEG,
    "comm_args.round_timeout_s": POS,
    "comm_args.startup_timeout_s": Num(float, 0, open_low=True, optional=True),
}

PARAM_RULES: Dict[str, Any] = {
    # every prompt method (algorithms/protocol.py PromptParams)
    "lr": POS,
    "momentum": Num(float, 0, 1, open_high=True),
    "weight_decay": NONNEG,
    "epochs": Num(int, 1, optional=True),  # null: train_args.epochs
    # pFedMoAP
    "lam": NONNEG,
    "lambda": NONNEG,  # alias of lam
    "num_experts": INT_POS,  # K + 1, counting the local expert
    "d_gating": Num(int, 1, optional=True),
    "heads": INT_POS,
    "scaling": POS,
    "gate_lr": NONNEG,
    # FedProx (proximal weight) and FedPGP (contrastive weight)
    "mu": NONNEG,
    # FedPGP
    "rank": INT_POS,
    "tau": POS,
    # FedOTP
    "eps": POS,
    "gamma": Num(float, 0, 1, open_low=True),
    "thresh": POS,
    "max_iter": INT_POS,
    "check_every": INT_POS,
    "eval_chunk": INT_POS,
    "patch_cache_gb": Num(float, 0, optional=True),
    # PromptFolio
    "theta": PROB,
    # FedTPG
    "n_ctx": INT_POS,
    "cosine_t_max": Num(int, 1, optional=True),
    # FedPHA
    "alpha": NONNEG,
    "ratio": Num(float, 0, 1, open_low=True),
    "local_lengths": Each(INT_POS),
    "local_length_range": Each(INT_POS),
    # pFedMMA
    "adapter_dim": INT_POS,
    "adapter_scale": POS,
    "adapter_start": Num(int, 1, optional=True),
    "token_cache_gb": Num(float, 0, optional=True),
    # FedMGP
    "groups": INT_POS,
    "visual_ctx": INT_POS,
    "topk": INT_POS,
    "temperature": POS,
    "div_weight": NONNEG,
}


def check_params(where: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """``params`` with every numeric hyperparameter checked and converted (``where``: ``algorithm_args.<name>``)."""
    return {k: PARAM_RULES[k].check(f"{where}.{k}", v) if k in PARAM_RULES else v for k, v in params.items()}
