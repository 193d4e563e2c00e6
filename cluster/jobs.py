"""`raygpt submit` and `raygpt jobs`: any raygpt subcommand as a Ray job on a cluster, through the job server.

    raygpt submit --address http://127.0.0.1:8265 -- run configs/cloud_gpu.yaml
    raygpt submit --address http://127.0.0.1:8265 --no-wait -- train configs/shakespeare.yaml cluster.num_workers=16
    raygpt jobs list   --address http://127.0.0.1:8265
    raygpt jobs status|logs|stop JOB_ID --address http://127.0.0.1:8265 [--follow]

The job ships this repository as its `working_dir` (without .venv, runs, .git) and runs `raygpt SUBCOMMAND ARGS` on
the cluster, whose image has the same pinned stack. `submit` streams the job's logs and exits with its status
(0 succeeded, 1 failed or stopped). The address is `--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS. With token
authentication on (RAY_AUTH_MODE=token), Ray's client sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token; a job server without it refuses the request.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from core.errors import UserError

EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class JobError(UserError, RuntimeError):
    """The job server cannot be reached or refused the request; one line for the user."""


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no job server address: give --address http://HOST:8265 (or set RAY_ADDRESS)")
    return address


def client(address: str | None) -> JobSubmissionClient:
    address = _address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or an HTTP error when authentication fails
        raise JobError(f"cannot use the job server at {address}: {str(e).splitlines()[0]}") from None


def runtime_env(working_dir: str, env_vars: dict[str, str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's runtime_env: this repository as working_dir (heavy local folders excluded) and env vars."""
    env = dict(extra or {})
    env.setdefault("working_dir", str(Path(working_dir).resolve()))
    env["excludes"] = [*env.get("excludes", []), *EXCLUDES]
    env["env_vars"] = {"RAY_USAGE_STATS_ENABLED": "0", **env.get("env_vars", {}), **env_vars}
    return env


async def _stream(jobs: JobSubmissionClient, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait(jobs: JobSubmissionClient, job_id: str, timeout_s: float | None = None) -> JobStatus:
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while (status := jobs.get_job_status(job_id)) not in TERMINAL:
        if deadline and time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(1)
    return status


AGENT_WAIT_S = 180.0
"""How long `submit` retries while the job server has no agent (Ray's "try again later"): on a busy or just-started
head it was seen to take over a minute."""


def submit(
    address: str | None, argv: list[str], working_dir: str = ".", env_vars: dict[str, str] | None = None,
    follow: bool = True, job_id: str | None = None,
) -> int:
    """Submit `raygpt ARGV` as a job; with follow, stream its logs and return its exit status."""
    if not argv:
        raise JobError("nothing to submit: raygpt submit --address URL -- SUBCOMMAND ARGS")
    jobs = client(address)
    entrypoint = shlex.join(["raygpt", *argv])
    deadline, said = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir, env_vars or {}),
                                     submission_id=job_id)
            break
        except RuntimeError as e:
            # a cluster that just started may not have registered its job agent yet: Ray asks to retry
            if "No available agent" in str(e) and time.monotonic() < deadline:
                if not said:
                    print(f"[submit] the job server has no agent yet (a cluster starting, or a busy head); retrying "
                          f"for up to {AGENT_WAIT_S:.0f} s", flush=True)
                    said = True
                time.sleep(2)
                continue
            raise JobError(f"the job server refused the job: {str(e).splitlines()[0]}") from None
    print(f"[submit] {job_id}: {entrypoint}", flush=True)
    if not follow:
        return 0
    asyncio.run(_stream(jobs, job_id))
    status = wait(jobs, job_id)
    print(f"[submit] {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def jobs_command(action: str, address: str | None, job_id: str | None, follow: bool = False) -> int:
    jobs = client(address)
    if action == "list":
        for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
            print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {started}  {job.entrypoint}")
        return 0
    if not job_id:
        raise JobError(f"raygpt jobs {action} needs a JOB_ID (see raygpt jobs list)")
    try:
        if action == "status":
            print(jobs.get_job_status(job_id).value)
        elif action == "logs":
            asyncio.run(_stream(jobs, job_id)) if follow else print(jobs.get_job_logs(job_id), end="")
        elif action == "stop":
            print(f"stop requested: {jobs.stop_job(job_id)}")
    except RuntimeError as e:
        raise JobError(f"{job_id}: {str(e).splitlines()[0]}") from None
    return 0
