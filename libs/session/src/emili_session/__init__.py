"""The session record every EMILI service shares: written by chat, read by labeler, trainer and pipeline."""
