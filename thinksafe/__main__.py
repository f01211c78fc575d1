from thinksafe.interrupt import run_entry_point

# The program owns its signals (SIGTERM taken like Ctrl-C, children stopped on the way out), from
# before the stage's imports: thinksafe.interrupt. In-process callers of thinksafe.cli.main are left alone.
run_entry_point("thinksafe.cli")
