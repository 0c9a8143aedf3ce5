"""MGRAL, the mAP-guided reinforced sampling agent: features, surrogate table, reward
model, agent (one module each) and the strategy that runs them (:mod:`.strategy`)."""

from mgral.strategies.mgral.strategy import MGRAL

__all__ = ["MGRAL"]
