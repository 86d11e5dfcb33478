"""`python -m adapter_hub.cli`: the same as the `adapter-hub` command."""

from . import main

main(prog_name="adapter-hub")
