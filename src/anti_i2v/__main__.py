"""``python -m anti_i2v``: the same command line as ``anti-i2v``."""

from anti_i2v.cli import main

main()
