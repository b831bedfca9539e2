"""Seed 000's "Example Complete Transaction", with real UUIDs in place of its placeholders."""

from __future__ import annotations

import json
import uuid


def seed_example(site: str = "observatory", obs_unit_id: int = 123) -> tuple[dict, dict[str, str]]:
    ids = {name: str(uuid.uuid4()) for name in ("uuid-1", "uuid-2", "uuid-3", "uuid-4")}
    tx = {
        "transaction_id": str(uuid.uuid4()),
        "endpoint": "create_observation_with_files",
        "site": site,
        "timestamp": "2025-01-01T00:00:00Z",
        "status": "pending",
        "retry_count": 0,
        "steps": [
            {"step_id": "step1", "operation": "create", "model_class": "ExecutedObsUnit",
             "data": {"id": ids["uuid-1"], "obs_unit_id": obs_unit_id,
                      "start_time": "2025-01-01T00:00:00Z", "status": "running"}},
            {"step_id": "step2", "operation": "create", "model_class": "RawDataPackage",
             "data": {"id": ids["uuid-2"], "name": "obs_123_package", "executed_obs_unit_id": ids["uuid-1"]},
             "dependencies": ["step1"]},
            {"step_id": "step3", "operation": "bulk_create", "model_class": "RawDataFile",
             "data": [{"id": ids["uuid-3"], "name": "file1.fits", "raw_data_package_id": ids["uuid-2"]},
                      {"id": ids["uuid-4"], "name": "file2.fits", "raw_data_package_id": ids["uuid-2"]}],
             "dependencies": ["step2"]},
        ],
    }
    return tx, ids


def seed_example_json(site: str = "observatory") -> tuple[str, dict, dict[str, str]]:
    tx, ids = seed_example(site)
    return json.dumps(tx), tx, ids
