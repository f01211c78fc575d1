from thinksafe.cli import main
from thinksafe.interrupt import run_entry_point

# The program owns its signals (SIGTERM taken like Ctrl-C, children stopped on the way out):
# thinksafe.interrupt; in-process callers of thinksafe.cli.main are left alone.
run_entry_point(main)
