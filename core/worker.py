"""The Procfile's worker: a small supervisor that keeps one in-process RQ worker running.

The supervisor imports nothing heavy. It forks a child that loads the flows and runs
core.flow_worker.InProcessFlowWorker for up to JOBS_PER_CHILD jobs (so that memory a job
leaks is given back), and starts another child when that one exits or dies, with a
growing pause when children die young. A job whose child died is run again by the sweep.
On SIGTERM the child finishes its current job; after GRACE_S it is killed, within the
30 s Heroku and Render allow.
"""

import logging
import os
import signal
import sys
import time

from core import logs

logger = logging.getLogger(__name__)

JOBS_PER_CHILD = 5000
GRACE_S = 25
# A child that lived shorter than this died of something at start-up (Redis down, a bad
# config): wait before the next, up to MAX_PAUSE_S.
YOUNG_S = 10
MAX_PAUSE_S = 30


class Supervisor:
    """Fork worker children one at a time; pass SIGTERM and SIGINT on to the child."""

    def __init__(self) -> None:
        self.child: int | None = None
        self.stopping = False

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        logger.info("stopping signal=%s", signal.Signals(signum).name)
        if self.child:
            os.kill(self.child, signum)

    def _spawn(self) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            # Only the child loads the flows, the vendors' clients and the database driver.
            from core import flow_worker

            flow_worker.run(max_jobs=JOBS_PER_CHILD)
        except BaseException as exc:  # the child's last word; the supervisor decides what next
            logger.error("worker process failed error=%s", logs.safe_traceback(exc))
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _wait(self, pid: int) -> int:
        deadline: float | None = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if self.stopping and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("worker process still busy after %d s: killing it", GRACE_S)
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.2)

    def run(self) -> int:
        """Keep a child running until a signal says stop; returns the last child's exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        pause = 1.0
        code = 0
        while not self.stopping:
            born = time.monotonic()
            self.child = self._spawn()
            code = self._wait(self.child)
            self.child = None
            if self.stopping:
                break
            if code == 0:
                logger.info("worker process retired after its jobs; starting another")
                pause = 1.0
                continue
            lived = time.monotonic() - born
            pause = min(pause * 2, MAX_PAUSE_S) if lived < YOUNG_S else 1.0
            logger.warning(
                "worker process died code=%d lived_s=%.0f; another in %.0f s", code, lived, pause
            )
            self._pause(pause)
        return code

    def _pause(self, seconds: float) -> None:
        # In short naps, so that a SIGTERM during the pause ends it at once.
        until = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < until:
            time.sleep(0.2)


def main() -> None:
    """Supervise in-process workers until SIGTERM."""
    logs.configure()
    sys.exit(Supervisor().run())


if __name__ == "__main__":
    main()
