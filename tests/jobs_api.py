"""Submit one job through Ray's Jobs API and wait for it, as `ray job submit` does, but with
the job's status polled every 0.1 s: `ray job submit` follows the job's log in ticks and ends
~5 s after the job did (a `print` job: 7.0 s through `ray job submit`, 1.1-2.3 s here, on the
2-core VM). Prints the job's log, then exits with its driver's exit code.

    python tests/jobs_api.py ADDRESS -- python jobs/extract.py ...

test_multinode submits its jobs this way (the same Jobs API endpoint `ray job submit` calls);
the README's own `ray job submit` command is tested in test_s3.
"""

from __future__ import annotations

import shlex
import sys
import time

#: Seconds between two looks at the job's status.
POLL = 0.1


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    address, entrypoint = argv[0], shlex.join(argv[2:])
    # After the caller set the cluster's token in the environment: Ray reads it on import.
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint)
    try:
        while not client.get_job_status(job_id).is_terminal():
            time.sleep(POLL)
    except BaseException:  # interrupted or timed out by the test: do not leave the job running
        client.stop_job(job_id)
        raise
    info = client.get_job_info(job_id)
    sys.stdout.write(client.get_job_logs(job_id))
    print(f"job {job_id}: {info.status}, driver exit code {info.driver_exit_code}")
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return 0 if info.status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
