"""The ``dp:`` entry of ``algorithm_args.<algo>``: validated once, one error line naming the key (docs/privacy.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from ..config import ConfigError

ACCOUNTING = ("run", "release")


@dataclass(frozen=True)
class DPConfig:
    """ε (``inf``: no noise), δ, C_g, C_up (number or ``auto``), the σ rule (``accounting``) and whether cross-silo
    clients report the evaluation of their private models to the server (``report_eval``, outside the guarantee)."""

    epsilon: float
    delta: float = 0.05
    clip_grad: float = 1.0
    clip_update: Union[float, str] = "auto"
    accounting: str = "run"
    report_eval: bool = True

    @classmethod
    def parse(cls, raw: Optional[Mapping[str, Any]], where: str = "dp") -> Optional["DPConfig"]:
        """``None``/empty -> DP off; otherwise validate every key and return the config (one clear error each)."""
        if raw is None or isinstance(raw, DPConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{epsilon, delta, clip_grad, clip_update, accounting, "
                              f"report_eval}}, got {type(raw).__name__}")
        if not raw:
            return None
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - valid)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        if "epsilon" not in raw:
            raise ConfigError(f"{where}.epsilon is required (a positive number, or inf for no noise)")
        eps = _positive(raw["epsilon"], f"{where}.epsilon", allow_inf=True)
        delta = _positive(raw.get("delta", 0.05), f"{where}.delta")
        if delta >= 1:
            raise ConfigError(f"{where}.delta: expected 0 < delta < 1, got {raw.get('delta')!r}")
        clip_grad = _positive(raw.get("clip_grad", 1.0), f"{where}.clip_grad", allow_inf=True)
        cu = raw.get("clip_update", "auto")
        clip_update: Union[float, str] = "auto" if cu == "auto" else _positive(cu, f"{where}.clip_update",
                                                                               allow_inf=True)
        if math.isfinite(eps):  # a finite ε needs a finite sensitivity, else σ = inf and the upload is ±inf
            if clip_update != "auto" and math.isinf(clip_update):
                raise ConfigError(f"{where}.clip_update: a finite epsilon needs a finite clip norm, got inf")
            if clip_update == "auto" and math.isinf(clip_grad):
                raise ConfigError(f"{where}.clip_grad: a finite epsilon with clip_update: auto needs a finite "
                                  "clip_grad (C_up is derived from it), got inf")
        acc = str(raw.get("accounting", "run"))
        if acc not in ACCOUNTING:
            raise ConfigError(f"{where}.accounting: expected one of {list(ACCOUNTING)}, got {acc!r}")
        report = raw.get("report_eval", True)
        if not isinstance(report, bool):
            raise ConfigError(f"{where}.report_eval: expected true/false, got {report!r}")
        return cls(eps, delta, clip_grad, clip_update, acc, report)


def _positive(value: Any, key: str, allow_inf: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a positive number, got {value!r}") from None
    if isinstance(value, bool) or not (x > 0) or (math.isinf(x) and not allow_inf):
        what = "number or inf" if allow_inf else "finite number"
        raise ConfigError(f"{key}: expected a positive {what}, got {value!r}")
    return x
