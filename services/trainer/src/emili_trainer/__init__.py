"""EMILI trainer service. Its API and workers arrive with issue #6; only its settings exist so far."""
