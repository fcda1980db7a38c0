"""The promotion gate: does the new model replace the current champion?

A pure decision over two metric dicts, so that the rule is testable without a registry; the
flow fetches the metrics from MLflow and moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.config import GateConfig

ECE_KEY = "test_ece_after"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig
) -> Decision:
    """Promote when the candidate loses nothing on ``cfg.metric`` and stays calibrated.

    Args:
        candidate: the new model's test metrics (``cfg.metric`` and ``test_ece_after``).
        champion: the current champion's, or None when there is none yet.
        cfg: the thresholds (``gate`` in params.yaml).
    """
    if cfg.metric not in candidate:
        return Decision(False, f"candidate has no {cfg.metric}; refusing to promote blind")
    if champion is None:
        return Decision(True, f"no {cfg.champion_alias} yet: the first model becomes it")
    new, old = candidate[cfg.metric], champion.get(cfg.metric, float("-inf"))
    gain = new - old
    if gain < cfg.min_gain:
        return Decision(
            False, f"{cfg.metric} {new:.4f} vs {old:.4f} ({gain:+.4f} < {cfg.min_gain:+.4f})"
        )
    if ECE_KEY in candidate and ECE_KEY in champion:
        rise = candidate[ECE_KEY] - champion[ECE_KEY]
        if rise > cfg.max_ece_increase:
            return Decision(
                False,
                f"ECE {candidate[ECE_KEY]:.4f} vs {champion[ECE_KEY]:.4f} "
                f"(+{rise:.4f} > {cfg.max_ece_increase:.4f})",
            )
    return Decision(True, f"{cfg.metric} {new:.4f} vs {old:.4f} ({gain:+.4f}); ECE within bound")
