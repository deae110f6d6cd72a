"""Affect analysis shared by the labeler and the trainer: VAD lexicons and scoring, statistics, EmpatheticDialogues."""
