"""``emili pipeline``: simulated users and the end-to-end pipeline."""

from __future__ import annotations

import typer

app = typer.Typer(help="Simulated users, the collect-label-train-evaluate pipeline, load tests.", no_args_is_help=True)
