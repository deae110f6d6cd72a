"""The session record every EMILI service shares: written by chat, read by labeler, trainer and pipeline.

``events`` (event kinds, payloads, parsing), ``emotions`` (the seven FER labels), ``conversation`` (what the
model saw), ``registry`` (registered model versions and their adapters).
"""
