"""`python -m clusterkv_local.eval ...` = `clusterkv-local eval ...`."""
import sys

from ..cli import main

sys.exit(main(["eval"] + sys.argv[1:]))
