"""The runs of an experiment in lockstep, so that their alike phases meet in one stack (stacked.py trains it):
every strategy of every run is a job that goes on until it asks for a phase, and the phases all jobs asked for
are trained together, then the jobs go on. On a GPU the stacks take turns an epoch at a time, each on a CUDA
stream of its own. experiment.run_experiment runs it; its fit_phases makes the trainings."""
import contextlib
import threading

import torch

import report

class Lockstep:
    """Runs jobs, each one strategy on one run as merge.py writes it, one at a time: a job goes on until it
    asks its `train` for a phase, then waits. When every job waits or is done, fit_phases(asked) groups the
    phases asked for (alike ones of all runs as one stack) into trainings: dicts of `jobs` (those that wait
    on it), `stacked` and `epochs`, a generator that trains it, an epoch a turn where it is stacked (or
    fit_phases trains them all and returns None). Then the trainings run to their end and the waiting jobs
    go on; with overlap (on a GPU) they take turns an epoch at a time instead, each stacked one on a CUDA
    stream of its own, so that their small kernels can run side by side, and the jobs of one that is over
    go on at once, their next phases joining the turns.
    The jobs are threads that take turns, never two at once, so a job that seeds torch's generator draws
    from it undisturbed until it next asks for training (merge.py's strategies seed it before each draw)."""

    def __init__(self, fit_phases, overlap=False):
        self.fit_phases, self.overlap, self.asked, self.running, self.aborted = fit_phases, overlap, [], None, False
        self.back = threading.Event()  # a job's turn is over

    def train(self, models, data, s, epochs, drops, seeds, phase, lambdas=None, share=0.5, warmup=0, **hooks):
        job = self.running
        self.asked.append(dict(job=job, models=models, data=data, s=s, epochs=epochs, drops=tuple(drops),
                               seeds=seeds, phase=phase, lambdas=lambdas, share=share, warmup=warmup, hooks=hooks))
        self.back.set()
        job["go"].wait()
        job["go"].clear()
        if self.aborted:
            raise SystemExit  # ends this job's thread quietly: another job failed, or Ctrl-C
        return models

    def run(self, jobs, done):
        """jobs: dicts holding work(train) -> its result; done(job, result) for each as it finishes."""
        gpu = torch.cuda.current_device() if torch.cuda.is_initialized() else None  # this rank's GPU

        def turn(job):
            if gpu is not None:  # a thread starts on GPU 0, and a DataLoader's pinning thread would open a context
                torch.cuda.set_device(gpu)  # there for every rank of a machine: the jobs' evaluations make them
            job["go"].wait()
            job["go"].clear()
            try:
                if not self.aborted:
                    job["result"] = job["work"](self.train)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                job["error"] = e
            job["finished"] = True
            self.back.set()
        for job in jobs:
            job.update(go=threading.Event(), finished=False)
            threading.Thread(target=turn, args=(job,), daemon=True).start()
        ready, training = list(jobs), []  # the jobs to go on; the trainings not yet over
        try:
            while not all(job["finished"] for job in jobs):
                for job in ready:
                    self.running = job
                    self.back.clear()
                    job["go"].set()
                    self.back.wait()
                    if job["finished"] and "error" in job and not isinstance(job["error"], SystemExit):
                        raise job["error"]
                    if job["finished"]:
                        done(job, job["result"])
                asked, self.asked = self.asked, []
                trainings = self.fit_phases(asked) if asked else []
                if trainings is None:  # fit_phases trained them
                    trainings = [dict(jobs=[a["job"] for a in asked], epochs=iter(()))]
                training += [self.started(t) for t in trainings]
                over = self.by_turns(training) if self.overlap and training else training
                for t in () if self.overlap else over:
                    while not self.turn(t):
                        pass
                training = [t for t in training if all(t is not o for o in over)]
                waiting = {id(job) for t in over for job in t["jobs"]}
                ready = [job for job in jobs if id(job) in waiting]
                assert ready or training or all(job["finished"] for job in jobs), "jobs wait on no training"
        finally:
            self.aborted = True
            for job in jobs:
                job["go"].set()

    def started(self, training):
        if self.overlap and training.get("stacked") and torch.cuda.is_available():
            training["stream"] = torch.cuda.Stream()
            training["stream"].wait_stream(torch.cuda.current_stream())  # its data and models are made
        return training

    def by_turns(self, training):
        """An epoch of each training in turn, until one or more is over: those."""
        while True:
            if over := [t for t in training if self.turn(t)]:
                return over

    def turn(self, training):
        """The training's next epoch (all of it where it is not stacked), on its stream: whether it is over."""
        stream = training.get("stream")
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            try:
                next(training["epochs"])
                if report.interrupted:  # a Ctrl-C that torch swallowed (report.on_interrupt), the epoch kept
                    raise KeyboardInterrupt
                return False
            except StopIteration:
                pass
        if stream:  # the jobs go on on the default stream: after its last kernels
            torch.cuda.current_stream().wait_stream(stream)
        return True
