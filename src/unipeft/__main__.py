"""`python -m unipeft ...` is the `unipeft` command."""

from unipeft.cli import main

main()
