"""This command as several processes on one machine, started as torchrun starts its ranks (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), without torchrun's own report: the sine's processes
(merge.py --workers) and ImageNet's ranks on one machine (imagenet.py --processes). What went wrong is
the last line printed: rank 0's, or the launcher's for a rank killed by a signal."""
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

import experiment


def launch(s, n, script, run):
    """This command as n processes of script, ranks of one process group with one thread each (and a GPU
    each on --device cuda), as torchrun would start them; where no local port is free, run(s) in this process.
    The caller has checked every setting, --out's files too (experiment.check_settings), before any starts.
    This process waits and adds nothing to what the ranks print (rank 0 says what went wrong) but for a rank
    killed by a signal; Ctrl-C, or a rank that fails, ends them all, and the exit code is the failed rank's."""
    try:  # a free port for the ranks' process group
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
    except OSError as e:
        experiment.log.warning(f"note: no local port for {n} processes ({e.strerror or type(e).__name__}); "
                               "one process trains")
        return run(s)
    env = {"TORCH_CPP_LOG_LEVEL": "ERROR",  # not c10d's warning with a C++ stack when Ctrl-C comes as a rank connects
           **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(n), "MERGE_LAUNCHER": str(os.getpid())}
    argv = []  # every setting of the command line as s holds it (a list's values one by one; flags left out)
    for f in (f for f in dataclasses.fields(s) if "help" in f.metadata):
        value = getattr(s, f.name)
        if isinstance(value, tuple) and value:
            argv += [experiment.flag(f), *map(str, value)]
        elif not isinstance(value, (bool, tuple)):
            argv.append(f"{experiment.flag(f)}={value}")
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the ranks, as Ctrl-C does
    procs, failed = [], None
    try:
        for r in range(n):  # Ctrl-C reaches them from here, once
            procs.append(subprocess.Popen([sys.executable, script, *argv], start_new_session=True,
                                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
        while any(p.poll() is None for p in procs):
            if failed is None and any(p.poll() for p in procs):  # one failed: the others would wait for it for ever
                failed = next(rank for rank, p in enumerate(procs) if p.poll())
                stop(procs)
            time.sleep(0.1)
    except BaseException:  # Ctrl-C, or a rank that could not start: none is left running
        stop(procs)
        raise
    finally:  # a caller that goes on (gpu_check.py) and its forked children keep their own SIGTERM
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
    codes = [p.returncode for p in procs]
    if failed is not None and codes[failed] < 0:  # killed: it could not say so itself
        print(f"error: worker {failed} of {n} (pid {procs[failed].pid}) was ended by signal {-codes[failed]} "
              f"({signal.Signals(-codes[failed]).name}); every finished row and phase is kept, and the same command "
              "resumes", file=sys.stderr)
        sys.exit(1)
    if any(codes):  # the failed rank's exit code (the others were stopped); a signal's (negative): 1
        sys.exit(codes[failed] if failed is not None and codes[failed] > 0 else next((c for c in codes if c > 0), 1))

def stop(procs, patience=5):
    """Ends the ranks still running (SIGTERM; SIGKILL after `patience` seconds, for one stuck in a collective
    with a dead peer) and waits for them."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(patience)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

def guard():
    """In a rank that launch() or torchrun started, SIGTERM (launch()'s stop, torchrun's, a scheduler's) ends it
    quietly, and a file being written goes (a rank killed outright leaves its temporary file, of a phase up to
    some 350 MB for ImageNet); the launcher says what happened. (Its launcher's end ends it too:
    experiment.start_ranks.)"""
    if os.environ.get("MERGE_LAUNCHER") or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        signal.signal(signal.SIGTERM, end_rank)

def end_rank(*_):
    """SIGTERM in a rank: exit code 130. Before its process group is up a rank has written nothing, and it ends at
    once (an exception in c10d's connecting could leave a C++ thread running: "terminate called without an active
    exception"); later by SystemExit, which lets a file being written go (report.written_whole). Where that
    cannot end it (raised in a callback, such as an import's, whose exceptions Python prints and ignores),
    os._exit ends it a second later, without the print; and it logs nothing more in that second (a compiled
    step cut short would say that torch.compile failed)."""
    if not torch.distributed.is_initialized():
        os._exit(130)
    sys.unraisablehook = lambda unraisable: None
    logging.disable(logging.CRITICAL)
    backstop = threading.Timer(1, os._exit, (130,))
    backstop.daemon = True  # no wait at a normal exit
    backstop.start()
    sys.exit(130)
