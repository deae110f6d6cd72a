"""EMILI labeler: VAD gold labels, reaction flags, per-user emotion weights and training datasets."""
