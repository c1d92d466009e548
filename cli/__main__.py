"""`python -m mesimp_compress.cli`: the same as the `mesimp` command."""

from .main import main

main()
