"""Pipeline stages: each module holds plain functions (tested without Prefect) and the small
Prefect task that wraps them. Tasks pass paths, URIs and small pydantic models only."""
