"""Behaviour kept: the public JSON of a deterministic tiny index equals the recording made before issue 11's rebuild.

`tests/golden/tiny_index.json` holds HTTP `/search`, `/loras/{id}`, `/loras/{id}/similar` and `carlos-ray query
--json` / `similar --json` (bodies, statuses, exit codes, error lines), recorded by `tests/golden_record.py` on the
code as it was before the move. Left out as volatile: `indexed_at` and the directory of `source_path`.
"""

from __future__ import annotations

import json

from tests.golden_record import GOLDEN, build_index, differences, record


def test_public_json_matches_the_recording(ray_session, tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(record(build_index(tmp_path))))  # the same JSON round trip as the recording
    diff = differences(got, want)
    assert not diff, f"{len(diff)} differences from {GOLDEN.name}, first: " + "; ".join(diff[:5])


def test_the_comparison_sees_a_change():
    want = json.loads(GOLDEN.read_text())
    changed = json.loads(json.dumps(want))
    changed["http"]["search"][0]["body"]["hits"][0]["score"] += 1e-3
    changed["cli_similar"][want["lora_ids"][0]]["exit"] = 1
    assert len(differences(changed, want)) == 2
    assert differences(want, want) == []
