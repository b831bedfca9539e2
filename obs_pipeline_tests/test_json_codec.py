"""The fast JSON codec reads and writes what the stdlib does, edges included."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obs_pipeline import json_codec
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry
from obs_pipeline.wire import Transaction, new_transaction, new_uuid, validate
from obs_pipeline_tests.examples import seed_example

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_reads_and_writes_as_the_stdlib_does(value):
    stdlib_text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert json_codec.loads(stdlib_text) == json.loads(stdlib_text)
    assert json_codec.loads(stdlib_text.encode()) == json.loads(stdlib_text)
    assert json.loads(json_codec.dumps(value)) == value


def test_integers_beyond_64_bits_keep_every_digit():
    big = 123456789012345678901234567890
    assert json_codec.loads(f'{{"n": {big}, "m": -{big}}}') == {"n": big, "m": -big}
    assert json_codec.loads(f'[{2**64 - 1}, {2**64}]') == [2**64 - 1, 2**64]
    assert json_codec.loads(f'[{-2**63}, {-2**63 - 1}]') == [-2**63, -2**63 - 1]  # 19 digits, below int64
    assert json_codec.dumps({"n": big}) == f'{{"n":{big}}}'
    # a long run of digits inside a string only sends the parse to the stdlib; the result is the same
    assert json_codec.loads('{"name": "run_20251231235959000001"}') == {"name": "run_20251231235959000001"}


def test_what_orjson_refuses_gets_the_stdlibs_answer():
    assert math.isnan(json_codec.loads('{"x": NaN}')["x"])  # the stdlib reads it; so do we
    with pytest.raises(ValueError, match="Expecting property name"):
        json_codec.loads("{not json")
    assert json_codec.loads('"\\ud800"') == "\ud800"  # a lone surrogate: validation refuses it later
    assert json_codec.dumps({1: "a"}) == '{"1":"a"}'  # keys that are not strings, as the stdlib
    assert json_codec.dumps({"name": "Čerenkov ☄"}) == '{"name":"Čerenkov ☄"}'


def test_a_transaction_survives_the_codec_unchanged():
    registry = ModelRegistry.from_path("obs_pipeline.models:Base")
    tx = validate(Transaction.from_json(json.dumps(seed_example()[0])), registry)
    again = validate(Transaction.from_json(tx.to_json()), registry)
    assert again.to_dict() == tx.to_dict()
    assert json.loads(tx.to_json()) == tx.to_dict()


@pytest.mark.parametrize("metadata", [{"at": object()}, {"x": float("nan")}, {"x": float("inf")}, ["not", "a", "dict"]])
def test_metadata_that_json_cannot_hold_is_refused_at_once(metadata):
    with pytest.raises(InvalidTransaction, match="metadata"):
        new_transaction("e", "site", metadata=metadata)


def test_new_uuid_is_a_canonical_random_uuid4():
    seen = set()
    for _ in range(2000):
        text = new_uuid()
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000
    variants = {new_uuid()[19] for _ in range(400)}
    assert variants == set("89ab")  # all four variant digits occur: the random bits stay random


def test_the_steps_digest_names_what_the_steps_say_not_how_they_are_spelled():
    """The drain tells a reclaimed transaction from an id reused for other steps by this digest:
    key order and spacing must not matter, any value must."""
    doc = seed_example()[0]
    steps = doc["steps"]
    respelled = json.loads(json.dumps(doc, indent=3, sort_keys=True))
    reordered = [dict(reversed(list(step.items()))) for step in steps]
    assert Transaction.from_json(json.dumps(doc)).steps_digest == Transaction.from_json(
        json.dumps(respelled)).steps_digest == json_codec.digest(reordered) == json_codec.digest(steps)
    changed = json.loads(json.dumps(steps))
    changed[-1]["data"][0]["name"] = "file1.fitz"
    assert json_codec.digest(changed) != json_codec.digest(steps)
    assert json_codec.digest([1]) != json_codec.digest([1.0]) != json_codec.digest(["1"])
    # what orjson cannot write goes the stdlib's way, still one digest per value
    assert json_codec.digest(["\ud800", 2 ** 70]) == json_codec.digest(["\ud800", 2 ** 70])
    assert json_codec.digest(["\ud800", 2 ** 70]) != json_codec.digest(["\ud801", 2 ** 70])
    assert len(json_codec.digest(steps)) == 16
