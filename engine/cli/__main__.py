"""`python -m engine.cli`: the `clipbt` command without its console script."""

from engine.cli import main

main()
