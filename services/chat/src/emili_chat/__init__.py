"""EMILI chat service. Its API and workers arrive with issue #4; only its settings exist so far."""
