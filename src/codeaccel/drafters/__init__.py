"""Drafters: where speculative tokens come from (see ``base.Drafter`` for the contract)."""

from codeaccel.drafters.base import Draft, Drafter

__all__ = ["Draft", "Drafter"]
