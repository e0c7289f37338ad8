"""`python -m fidellm` is the `fidellm` command."""

from fidellm.cli import main

main()
