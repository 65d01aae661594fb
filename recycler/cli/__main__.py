"""`python -m recycler.cli`: the recycler command."""

from recycler.cli.app import main

main()
