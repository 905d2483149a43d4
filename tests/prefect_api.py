"""What the tests read back from the Prefect API about a run, once the API has all of it."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId


def final_task_runs(flow_run_id, timeout: float = 60) -> list:
    """The flow run's task runs as the Prefect API has them once each has its final state.

    Two things Prefect 3.9 does that a test must not trip on: it records task-run states from the
    events the run emits, after the flow returns, so right after a flow run the API can still show a
    task as Running (a CI run saw that); and a task called on its own later in the same process is
    filed under the last flow run (another test's, on the same xdist worker). So this drops the runs
    that started after the flow run ended, and reads until the rest are final, failing after `timeout`
    s with the laggards' names."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                    if not _after(r.start_time or r.expected_start_time, flow_run.end_time)]
            pending = [(r.name, r.state.name if r.state else None) for r in runs if not (r.state and r.state.is_final())]
            if flow_run.state and flow_run.state.is_final() and not pending:
                return runs
            assert time.monotonic() < deadline, f"flow run {flow_run_id}: not final after {timeout} s: {pending}"
            time.sleep(0.5)


def _after(when, end) -> bool:
    """Whether a task run that started at `when` began after its flow run ended at `end` (either unknown: no)."""
    return when is not None and end is not None and when > end
