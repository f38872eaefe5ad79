"""Run command lines as subprocesses for a check script, record each result, and keep a
summary file current. Used by `training.device_check`.

Each step runs in a session of its own, so that ending it on a timeout (or on Ctrl-C) reaches
everything it started: torchrun, for one, starts its workers in their own sessions too and
stops them itself when it receives SIGTERM, so the group gets SIGTERM first, SIGKILL after a
grace period, and the pipes are abandoned if an orphan still holds them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.settings import PROJECT_ROOT

GRACE_SECONDS = 30  # after SIGTERM, before SIGKILL (torchrun needs a moment to stop its workers)
KILL_WAIT_SECONDS = 10  # after SIGKILL, before giving up on the pipes


class Steps:
    """Runs ``python ARGS`` steps, records what each did, keeps OUT/summary.json current."""

    def __init__(self, out: Path, device: str, timeout: float = 1800, platform: dict | None = None):
        self.out, self.device, self.timeout, self.results = out, device, timeout, []
        self.env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        self.platform = platform or {}

    def run(self, name: str, args: list[str], check=None) -> bool:
        """Run ``python ARGS``; `check(completed_process)` (if given) returns a detail or raises."""
        started = time.time()
        proc = run_in_own_session([sys.executable, *args], self.env, self.timeout)
        (self.out / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        record = {"step": name, "ok": proc.returncode == 0, "rc": proc.returncode,
                  "seconds": round(time.time() - started, 1)}
        if record["ok"] and check is not None:
            try:
                record["detail"] = check(proc)
            except Exception as exc:  # noqa: BLE001 - a failed check is a result, not a crash
                record.update(ok=False, detail=f"check failed: {exc}")
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr[-1500:]
        print(json.dumps(record), flush=True)
        self.results.append(record)
        self.write_summary()
        return record["ok"]

    def failed(self) -> list[str]:
        """Names of the steps that did not pass."""
        return [r["step"] for r in self.results if not r["ok"]]

    def write_summary(self) -> dict:
        """Write OUT/summary.json and return its headline (device, platform, passed, failed)."""
        summary = {"device": self.device, **self.platform, "passed": len(self.results) - len(self.failed()),
                   "failed": self.failed()}
        (self.out / "summary.json").write_text(json.dumps({**summary, "steps": self.results}, indent=1))
        return summary


def run_in_own_session(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session; on timeout (returncode -9 and a note on stderr) or on an
    interrupt (re-raised) end its whole process group."""
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                             env=env, cwd=PROJECT_ROOT, start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        stdout, stderr = end_process_group(popen)
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, stdout, stderr + f"\ntimed out after {timeout} s")
    except BaseException:  # Ctrl-C: the step has its own session, so it did not get the SIGINT
        end_process_group(popen)
        raise


def end_process_group(popen: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM the group, SIGKILL it after GRACE_SECONDS; the output read so far."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        try:
            return popen.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    # an orphan that left the group still holds the pipes: stop reading them
    for pipe in (popen.stdout, popen.stderr):
        with contextlib.suppress(OSError):
            pipe.close()
    popen.wait(timeout=KILL_WAIT_SECONDS)
    return "", "(output lost: a process outside the group kept the pipes open)"
