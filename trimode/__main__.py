"""`python -m trimode` runs the CLI."""

from .cli import main

main()
