"""Pydantic models: the one source for the CLI, the Prefect UI form, validation and the files a run writes.

    settings.py   configs/*.yaml + RECAST_* environment: profiles, defaults, policies
    requests.py   what a user asks for (every field has a description and bounds: CLI --help and UI form)
    jobs.py       what travels between a flow and its tasks: URIs and numbers, never image bytes
    manifests.py  what a run writes: manifests, records, the handoff
"""
