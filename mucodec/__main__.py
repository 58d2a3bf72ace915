"""``python -m mucodec``: the command line of ``generate.py``."""
import sys

from .cli import main

sys.exit(main(prog="python -m mucodec"))
