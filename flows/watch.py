"""Flow ``watch-data``: new labelled files in a model's data folder -> one ``finetune-flows.data.new-file`` event each.

Scheduled (deployment ``finance-watch-data``, every 10 minutes), it is the file watcher Prefect does
not have: the retrain deployment's trigger turns the events into a retrain run. See
``tasks/labelling/arrivals.py``. Deployments reach it by entrypoint ``flows/watch.py:watch_data``.
"""

from __future__ import annotations

from prefect import flow

from finetune_flows.tasks.labelling.arrivals import Arrivals, WatchConfig, announce_new_files


@flow(name="watch-data", log_prints=False)
def watch_data(config: WatchConfig) -> Arrivals:
    """Announce the labelled files that appeared or changed in the data folder since the last run."""
    return announce_new_files(config)
