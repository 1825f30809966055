"""Betting writes, by topic: events of the line provider (`events`), bet placement
(`placement`), settlement and its reconciler (`settlement`); the configured stake and
coefficient ranges (`ranges`) and the audit trail (`audit`) they share. Other code imports
them from here.

Lock order everywhere: the event (gate, row), then the change-sequence row (see lock_objects).
"""

from betting.services.events import (
    EVENTS_CACHE_GENERATION_KEY,
    OUTCOME_STATES,
    event_cancel,
    event_create,
    event_finish,
    event_odds_update,
)
from betting.services.placement import ODDS_CHANGE_POLICIES, Placement, bet_place
from betting.services.ranges import COEFFICIENT, STAKE
from betting.services.settlement import event_bets_settle, settlements_reconcile

__all__ = [
    "COEFFICIENT",
    "EVENTS_CACHE_GENERATION_KEY",
    "ODDS_CHANGE_POLICIES",
    "OUTCOME_STATES",
    "STAKE",
    "Placement",
    "bet_place",
    "event_bets_settle",
    "event_cancel",
    "event_create",
    "event_finish",
    "event_odds_update",
    "settlements_reconcile",
]
