"""Flow ``recommend``: top-k items per user (or ranked new items) from the registered champion.

With ``engine=dask`` the catalogue is embedded and the search built once, here; the users are scored
in partitions of ``partition_rows`` on a Dask cluster (a local one of ``workers`` processes, or the
cluster at ``address``), resumably, with the same lists (tasks.ranking.partitioned). Deployments
reach it by entrypoint ``flows/recommend.py:recommend``.
"""

from __future__ import annotations

from prefect import flow

from finetune_flows.tasks.ranking.recommending import RecommendConfig, RecommendResult, fetch_scorer, recommend_items


@flow(name="recommend", log_prints=False)
def recommend(config: RecommendConfig = RecommendConfig()) -> RecommendResult:  # noqa: B008
    """Rank items for users with the champion's ONNX encoder, excluding what they rated."""
    model_dir, model_uri = fetch_scorer(config)
    return recommend_items(config, model_dir, model_uri)
