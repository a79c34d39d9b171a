"""`python -m lorasched …` is the `lorasched` command (what launchers such as `accelerate launch -m` run)."""

from .cli import main

main()
