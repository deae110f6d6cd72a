"""EMILI end to end: simulated users, the pipeline canvas, and the load test."""
