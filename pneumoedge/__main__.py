"""`python -m pneumoedge` runs the CLI."""

from pneumoedge.cli import app

app()
