"""Who may do what: the roles of API keys (and console sessions) and the principal a
verified key acts as. Below the adapters that store keys and the entrypoints that check
them, so both import it from here."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    INGEST = "ingest"
    SHOP = "shop"
    OPERATOR = "operator"
    FEED = "feed"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return self.role is Role.OPERATOR or self.role is role
