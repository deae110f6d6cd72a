"""EMILI labeler service. Its API and workers arrive with issue #5; only its settings exist so far."""
