"""EMILI chat service: conversations with an LLM partner that sees a live readout of the user's face."""
