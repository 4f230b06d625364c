"""`python -m meshctl`: the same as the `meshctl` console script."""

from meshctl.cli import main

main()
