"""The one list of controllers: adding one is its module and a line here."""

from __future__ import annotations

from tierwise_operator.controllers.autoscaler import Autoscaler
from tierwise_operator.controllers.budgets import BudgetController, SpendObserver
from tierwise_operator.controllers.caches import CacheController, CacheObserver
from tierwise_operator.controllers.policies import PolicyController
from tierwise_operator.controllers.sla import SLAObserver
from tierwise_operator.controllers.tiers import TierController
from tierwise_operator.manager import Manager


def register(m: Manager) -> None:
    autoscaler = Autoscaler(m)
    sla = SLAObserver(m)
    m.register(TierController(m, autoscaler, sla))
    m.register(autoscaler)
    m.register(sla)
    spend = SpendObserver(m)
    m.register(spend)
    m.register(BudgetController(m, spend))
    caches = CacheObserver(m)
    m.register(caches)
    m.register(CacheController(m, caches))
    m.register(PolicyController(m, spend, sla))
