"""What a command does before it imports torch: Ctrl-C while torch loads (seconds) ends it with one line and
exit code 130, not a traceback of the import; experiment.main makes Ctrl-C a KeyboardInterrupt again."""
import os
import signal
import sys


def quiet_interrupt():
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted while starting", file=sys.stderr) or 130))
