"""The transaction wire format (seed 000, contract §4): JSON in and out, and its validation.

The same checks run at ingest (nothing bad is buffered) and in the drain (the buffer is a
trust boundary: other producers push to it too). `plan_writes` turns a valid transaction
into row writes in dependency order, with values converted for binding.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from obs_pipeline import json_codec
from obs_pipeline.column_values import CANONICAL_UUID, json_value, one_line_text, unicode_lower
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry, ModelSpec

OPERATIONS = ("create", "update", "delete", "bulk_create")
STATUSES = ("pending", "processing", "applied", "replicated", "failed")
DEFAULT_MAX_RETRIES = 3

# Our transaction JSON starts with the status in a slot wide enough for every status, padded
# with spaces (JSON whitespace): `{"status":"pending"   ,"transaction_id":...`. The drain then
# changes a status in place with one SETRANGE of 11 bytes instead of rewriting the whole
# transaction (buffer_store.py checks the header before it writes; other layouts are rewritten).
STATUS_OPENING = '{"status":"'
STATUS_OFFSET = len(STATUS_OPENING)                    # where the slot starts
STATUS_SLOT = max(len(s) for s in STATUSES) + 1        # the value, its closing quote, spaces
STATUS_HEADER_LEN = STATUS_OFFSET + STATUS_SLOT + 1    # ... and the comma after it


def status_slot(status: str) -> str:
    """`processing"` / `pending"   `: what goes at STATUS_OFFSET for this status."""
    return (status + '"').ljust(STATUS_SLOT)


def status_header(status: str) -> str:
    return STATUS_OPENING + status_slot(status) + ","


_STATUS_HEADERS = {s: status_header(s) for s in STATUSES}  # to_json's, made once


@dataclass
class Step:
    step_id: str
    operation: str
    model_class: str
    data: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    dependencies: list[str] = field(default_factory=list)
    expected_result: str | None = None

    def records(self) -> list[dict[str, Any]]:
        """The row dicts of a create or bulk_create."""
        return self.data if isinstance(self.data, list) else [self.data]


@dataclass
class Transaction:
    transaction_id: str
    endpoint: str
    site: str
    timestamp: str
    status: str = "pending"
    retry_count: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    steps: list[Step] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # {model: [id, ...]}: rows of a generated-id model created with a key the caller gave, which
    # ingest overlaid like an integer key's (see cache_footprint); None for the rest. Not a step
    # field: cache bookkeeping, outside steps_digest.
    overlaid_creates: dict[str, list[str]] | None = None
    # {model: [id, ...]}: rows of other models its deletes take with them or empty a key of, as
    # main's foreign keys do (ON DELETE CASCADE / SET NULL), which ingest overlaid for reads (see
    # cache_footprint); None for the rest. Cache bookkeeping too, outside steps_digest.
    cascaded: dict[str, list[str]] | None = None
    # What the steps were as pushed (json_codec.digest), set by from_json: the drain records it
    # with the applied id, to tell an id a producer reused for other steps from this one claimed again.
    steps_digest: str | None = field(default=None, compare=False)
    # (model, key as pushed, created) for each key whose text validate() changed (see _note_rekeyed):
    # ingest filed its caches under that text. Not serialised: cache bookkeeping for this parse.
    rekeyed: list[tuple[str, str, bool]] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Shallow on purpose: `dataclasses.asdict` deep-copies every value and was 40% of the
        drain's CPU. Values are shared with this transaction, so serialise, don't mutate."""
        doc = {
            "status": self.status, "transaction_id": self.transaction_id, "endpoint": self.endpoint,
            "site": self.site, "timestamp": self.timestamp, "retry_count": self.retry_count,
            "max_retries": self.max_retries, "metadata": self.metadata,
            "steps": [{"step_id": s.step_id, "operation": s.operation, "model_class": s.model_class,
                       "data": s.data, "conditions": s.conditions, "dependencies": s.dependencies,
                       "expected_result": s.expected_result} for s in self.steps],
        }
        if self.overlaid_creates:  # only ingest's transactions with a given uuid key carry it
            doc["overlaid_creates"] = self.overlaid_creates
        if self.cascaded:  # only ingest's deletes whose foreign keys cascade carry it
            doc["cascaded"] = self.cascaded
        return doc

    def to_json(self) -> str:
        """Compact JSON with the status first, in its fixed-width slot (see STATUS_SLOT)."""
        body = self.to_dict()
        del body["status"]
        header = _STATUS_HEADERS.get(self.status) or status_header(self.status)
        return header + json_codec.dumps(body)[1:]

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Transaction":
        """Parse untrusted JSON; raise InvalidTransaction saying what is malformed."""
        try:
            doc = json_codec.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidTransaction(f"not valid JSON: {exc}") from None
        except RecursionError:  # the stdlib's parser (orjson's refuses past 1,024 levels)
            raise InvalidTransaction("not valid JSON: nested too deeply (more than about 1,000 levels)") from None
        tx = cls.from_dict(doc)
        tx.steps_digest = json_codec.digest(doc["steps"])
        return tx

    @classmethod
    def from_dict(cls, doc: Any) -> "Transaction":
        if not isinstance(doc, dict):
            raise InvalidTransaction("a transaction must be a JSON object")
        tx_id = doc.get("transaction_id")
        if not is_storable_id(tx_id):
            raise InvalidTransaction("transaction_id is missing or not a non-empty string of at most 200 "
                                     "characters without NUL or lone surrogates")
        steps = doc.get("steps")
        if not isinstance(steps, list) or not steps:
            raise InvalidTransaction(f"transaction {tx_id}: `steps` must be a non-empty list")
        retry_count = doc.get("retry_count", 0)
        max_retries = doc.get("max_retries", DEFAULT_MAX_RETRIES)
        if not _is_int(retry_count) or not _is_int(max_retries) or retry_count < 0 or max_retries < 0:
            raise InvalidTransaction(f"transaction {tx_id}: retry_count/max_retries must be integers >= 0")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidTransaction(f"transaction {tx_id}: `metadata` must be an object")
        status = doc.get("status", "pending")
        endpoint = str(doc.get("endpoint") or "")
        site = str(doc.get("site") or "")
        timestamp = str(doc.get("timestamp") or "")
        overlaid = doc.get("overlaid_creates")
        if overlaid is not None and not _is_id_lists(overlaid):
            overlaid = None  # a producer's own field of that name: ingest wrote no overlay for it
        cascaded = doc.get("cascaded")
        if cascaded is not None and not _is_id_lists(cascaded):
            cascaded = None  # (likewise)
        parsed = []  # (a loop: a comprehension here would make tx_id a cell, paid by every call)
        for index, step in enumerate(steps):
            parsed.append(_step_from_dict(tx_id, index, step))
        # positional, as in _step_from_dict: keywords cost two conversions of a dict per call
        return cls(tx_id, endpoint, site, timestamp, status if status in STATUSES else "pending", retry_count,
                   max_retries, parsed, metadata, overlaid or None, cascaded or None)


def listed_steps_digest(tx: Transaction, registry: ModelRegistry) -> str:
    """Its steps' digest as its dead letter lists them (Transaction.to_dict: each step with every
    field, those a producer left out written with their defaults), for `failed discard` to know a
    copy pushed since (see SiteKeys.discarded): steps_digest is of the steps as pushed, and a
    producer's copy left out what the letter wrote. Without the columns SQLAlchemy computes (a
    callable default of a create, an onupdate of an update): the drain fills those as it checks
    each copy (validate), the letter listed the first one's (a time), a copy got its own, and a
    producer's copy of a discarded update was applied."""
    steps = tx.to_dict()["steps"]  # (each step a dict of its own: changed here, not in tx)
    for step in steps:
        model = registry.models.get(step["model_class"]) if isinstance(step["model_class"], str) else None
        if model is None:
            continue
        computed = (model.computed_defaults if step["operation"] in ("create", "bulk_create")
                    else model.onupdates if step["operation"] == "update" else None)
        if computed:
            data = step["data"]
            step["data"] = ([_without(row, computed) for row in data] if isinstance(data, list)
                            else _without(data, computed))
    return json_codec.digest(steps)


def _without(row: Any, columns: dict[str, Any]) -> Any:
    return {k: v for k, v in row.items() if k not in columns} if isinstance(row, dict) else row


def is_storable_id(value: Any) -> bool:
    """A transaction id that PostgreSQL (the applied-id record) and Redis (key names) can both
    hold: 1-200 characters, no NUL, valid Unicode. Anything else from a producer would stop
    the drain at every attempt, so it is refused and the entry dead-lettered without it."""
    if not isinstance(value, str) or not 0 < len(value) <= 200 or "\x00" in value or value.startswith("!"):
        return False  # (held_ids marks a dead-lettered holder with a leading "!")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def one_line(value: Any) -> str:
    """A producer's text (an endpoint, a step id, a reason that quotes one) as one printable line:
    control characters and lone surrogates escaped. A lone surrogate cannot be printed or stored
    as UTF-8, and a newline or tab would break a line of `failed list`."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_lists(value: Any) -> bool:
    """`overlaid_creates`' and `cascaded`'s shape: {model: [id, ...]}, names and ids as text."""
    if not isinstance(value, dict):
        return False
    for model, ids in value.items():
        if not isinstance(model, str) or not isinstance(ids, list) or not _all_are(str, ids):
            return False
    return True


def _all_are(kind: type, items: list) -> bool:
    """all(isinstance(i, kind) for i in items), without a generator's cost (the drain checks
    the rows and dependencies of every step)."""
    for item in items:
        if not isinstance(item, kind):
            return False
    return True


def _step_from_dict(tx_id: str, index: int, doc: Any) -> Step:
    if not isinstance(doc, dict):
        raise InvalidTransaction(f"{_where(tx_id, index)}: a step must be a JSON object")
    operation = doc.get("operation")
    data = doc.get("data")
    if data is None:
        data = {}
    if operation == "bulk_create":
        if not isinstance(data, list) or not data or not _all_are(dict, data):
            raise InvalidTransaction(f"{_where(tx_id, index)}: bulk_create needs `data` as a non-empty list of objects")
    elif operation not in OPERATIONS:
        raise InvalidTransaction(f"{_where(tx_id, index)}: operation {operation!r} is not one of {', '.join(OPERATIONS)}")
    elif not isinstance(data, dict):
        raise InvalidTransaction(f"{_where(tx_id, index)}: `data` must be an object")
    conditions = doc.get("conditions") or {}
    dependencies = doc.get("dependencies") or []
    if not isinstance(conditions, dict):
        raise InvalidTransaction(f"{_where(tx_id, index)}: `conditions` must be an object")
    if not isinstance(dependencies, list) or not _all_are(str, dependencies):
        raise InvalidTransaction(f"{_where(tx_id, index)}: `dependencies` must be a list of step ids")
    step_id = doc.get("step_id")
    expected = doc.get("expected_result")
    # Step(step_id, operation, model_class, data, conditions, dependencies, expected_result), positional:
    # keyword arguments to a class cost two conversions of a dict per call. (model_class is
    # checked against the registry in validate().)
    return Step(str(step_id) if step_id is not None else f"step{index + 1}", operation, doc.get("model_class"),
                data, conditions, dependencies, str(expected) if expected is not None else None)


def _where(tx_id: str, index: int) -> str:
    """Where in a transaction an error is (built only for the message: every step pays otherwise)."""
    return f"transaction {tx_id}, step {index + 1}"


# --- validation against the models --------------------------------------------------------

def normalize_values(model: ModelSpec, values: dict[str, Any], *, creating: bool, where: str,
                     record: str | int | None = None) -> dict[str, Any]:
    """Check each value against its column; return the JSON form. Raises InvalidTransaction.
    `record`: the id an update is of. Its values may repeat it unchanged (a record as `get`
    returned it, passed back; a producer sending the whole row): left out, as it changes nothing."""
    converters = model.converters
    out = {}
    for name, value in values.items():
        try:
            convert = converters[name]
        except KeyError:
            raise InvalidTransaction(
                f"{where}: {model.name} has no column {name!r} (columns: {', '.join(model.columns)})"
            ) from None
        if not creating and name == model.primary_key:
            if record is not None and _names(convert, value, record):
                continue
            raise InvalidTransaction(f"{where}: the id of {model.name} cannot be changed by an update")
        if value is None:  # ColumnSpec.check's test, made here (see ModelSpec.converters)
            if name in model.not_null:
                raise InvalidTransaction(f"{where}: {model.name}.{name}: may not be null")
            out[name] = None
            continue
        try:
            out[name] = convert(value)
        except ValueError as exc:
            raise InvalidTransaction(f"{where}: {model.name}.{name}: {one_line_text(str(exc))}") from None
    if model.generated and not model.generated.isdisjoint(out):
        name = next(c for c in out if c in model.generated)
        raise InvalidTransaction(f"{where}: {model.name}.{name}: main computes this column (GENERATED ALWAYS): "
                                 "leave it out (of a record from get passed back to update too)")
    if creating and not model.required_on_create <= out.keys():
        raise InvalidTransaction(f"{where}: {model.name} is missing required column(s) {_missing(model, out)}")
    if creating and model.defaults:  # the constant defaults of the columns left out (ModelSpec.defaults):
        # buffered, the record reads as main will store it; the insert carries them explicitly
        for name, value in model.defaults.items():
            if name not in out:
                out[name] = copy.deepcopy(value) if value.__class__ in (dict, list) else value
    if creating and model.computed_defaults:  # a callable default, as SQLAlchemy would call it
        _fill(model, out, model.computed_defaults, where)
    elif not creating and out and model.onupdates:  # an onupdate, for an update that does not set it
        _fill(model, out, model.onupdates, where)
    return out


def _names(convert: Callable[[Any], Any], value: Any, record: str | int) -> bool:
    """`value`, a key column's, names the record `record` (an upper-case uuid does too)."""
    try:
        return value is not None and convert(value) == record
    except ValueError:
        return False


def _missing(model: ModelSpec, out: dict[str, Any]) -> str:
    """(Apart from normalize_values: a comprehension there would make `model` and `out` cells,
    created at every call.)"""
    return ", ".join(c for c in model.columns if c in model.required_on_create and c not in out)


def _fill(model: ModelSpec, out: dict[str, Any], computed: dict[str, Any], where: str) -> None:
    """Evaluate what SQLAlchemy computes in Python for the columns `out` leaves out (see
    model_registry._python_side): the statements then carry it like any value."""
    for name, compute in computed.items():
        if name not in out:
            try:
                out[name] = model.columns[name].check(compute(out))
            except ValueError as exc:
                raise InvalidTransaction(f"{where}: {model.name}.{name}: {one_line_text(str(exc))}") from None


def record_id(model: ModelSpec, value: Any, where: str) -> str | int:
    try:
        return model.columns[model.primary_key].check(value)
    except ValueError as exc:
        raise InvalidTransaction(f"{where}: {model.name}.{model.primary_key}: {one_line_text(str(exc))}") from None


def validate(tx: Transaction, registry: ModelRegistry, *, values_checked: bool = False) -> Transaction:
    """Check every step against the models and the step graph; normalize values in place.
    `values_checked`: the builder already normalised each step's values; check the graph only."""
    if values_checked:
        steps_in_order(tx)
        return tx
    if tx.metadata:  # as at ingest: it is written back with every status, and must stay writable
        try:
            json_value(tx.metadata)
        except ValueError as exc:
            raise InvalidTransaction(f"transaction {tx.transaction_id}: metadata: {exc}") from None
    for step in steps_in_order(tx):
        where = f"transaction {tx.transaction_id}, step {step.step_id}"
        if not isinstance(step.model_class, str):
            raise InvalidTransaction(f"{where}: model_class must be a string")
        try:
            model = registry.model(step.model_class)
        except InvalidTransaction as exc:  # with where: a dead letter's reason says which step
            raise InvalidTransaction(f"{where}: {exc}") from None
        pk = model.primary_key
        if step.operation == "create":  # (from_dict made its data a dict, a bulk_create's a list of dicts)
            given = step.data.get(pk)
            step.data = _new_row(model, step.data, where)
            if given is not step.data[pk]:
                _note_rekeyed(tx, model.name, given, step.data[pk], True)
        elif step.operation == "bulk_create":
            rows = []
            for row in step.data:
                given = row.get(pk)
                rows.append(_new_row(model, row, where))
                if given is not rows[-1][pk]:
                    _note_rekeyed(tx, model.name, given, rows[-1][pk], True)
            step.data = rows
        else:
            if set(step.conditions) != {model.primary_key}:
                raise InvalidTransaction(
                    f"{where}: {step.operation} needs conditions {{{model.primary_key!r}: ...}} and nothing else"
                )
            given = step.conditions[pk]
            step.conditions = {pk: record_id(model, given, where)}
            if given is not step.conditions[pk]:
                _note_rekeyed(tx, model.name, given, step.conditions[pk], False)
            if step.operation == "update":
                step.data = normalize_values(model, step.data, creating=False, where=where,
                                             record=step.conditions[model.primary_key])
                if not step.data:
                    raise InvalidTransaction(f"{where}: an update needs at least one column in `data`")
            elif step.data:
                raise InvalidTransaction(f"{where}: a delete takes no `data`")
    return tx


def _note_rekeyed(tx: Transaction, model: str, given: Any, checked: Any, created: bool) -> None:
    """A key whose text the check changed: an ingest of an earlier version filed the caches
    under the key as it pushed it (a NUMERIC key 5 before d3f75e5, now 5.0; a TIMESTAMP(0)
    key's 00:00:00.6, now 00:00:01), and the cleanup, named by the checked key, left them for
    good (a search showed the row twice, and its stale values after later updates)."""
    if given is not None and str(given) != str(checked):
        if tx.rekeyed is None:
            tx.rekeyed = []
        tx.rekeyed.append((model, str(given), created))


def _new_row(model: ModelSpec, row: dict[str, Any], where: str) -> dict[str, Any]:
    """A create's row, checked and normalised (its key was made at ingest)."""
    row = normalize_values(model, row, creating=True, where=where)
    if model.primary_key not in row:
        raise InvalidTransaction(f"{where}: {model.name} needs a pre-generated {model.primary_key}")
    return row


def steps_in_order(tx: Transaction) -> list[Step]:
    """Steps sorted so each comes after its dependencies (stable); bad graphs raise."""
    seen: set[str] = set()
    for step in tx.steps:  # the usual case, and every builder-made transaction: already in order
        if not seen.issuperset(step.dependencies):
            break
        seen.add(step.step_id)
    else:
        return list(tx.steps)
    return _sorted_steps(tx)


def _sorted_steps(tx: Transaction) -> list[Step]:
    """steps_in_order's sort. (A function of its own: its closure's six cells were made at every
    call of steps_in_order, sorted or not.)

    Steps may share a step id: seed 000's builder takes one from its caller
    (`step_id="create_file"` for each file, say) and its executor applies the steps in their
    order, so such a producer's transaction is applied as listed. A dependency on a shared id
    means the steps of that id listed before the dependent one (all the others if none is: a
    producer may list children first); a step that depends on its own id alone is a cycle."""
    by_id: dict[str, list[int]] = {}
    for index, step in enumerate(tx.steps):
        by_id.setdefault(step.step_id, []).append(index)
    for step in tx.steps:
        for dep in step.dependencies:
            if dep not in by_id:
                raise InvalidTransaction(
                    f"transaction {tx.transaction_id}, step {step.step_id}: depends on unknown step {dep!r}"
                )
    steps = tx.steps
    ordered, done, visiting = [], set(), set()

    def visit(index: int) -> None:
        if index in done:
            return
        step = steps[index]
        if index in visiting:
            raise InvalidTransaction(
                f"transaction {tx.transaction_id}: steps depend on each other in a cycle at {step.step_id!r}"
            )
        visiting.add(index)
        for dep in step.dependencies:
            places = by_id[dep]
            earlier = [other for other in places if other < index]
            # none listed before: the others of that id (children listed first); its own id
            # alone: itself, which `visiting` refuses as a cycle
            for other in earlier or [other for other in places if other != index] or [index]:
                visit(other)
        visiting.discard(index)
        done.add(index)
        ordered.append(step)

    for index in range(len(steps)):
        visit(index)
    return ordered


# --- what a transaction writes ------------------------------------------------------------

class RowWrite(NamedTuple):
    """One row-level write of a validated transaction, values still in JSON form. (A tuple: a
    batch makes one per row, and a frozen dataclass is slow to build.)"""
    model: str
    operation: str  # "insert" | "update" | "delete"
    record_id: Any
    values: dict[str, Any]
    tx: str | None = ""  # the transaction writing it (None: folded from several)


def row_writes(tx: Transaction, registry: ModelRegistry) -> Iterator[RowWrite]:
    tx_id = tx.transaction_id
    for step in steps_in_order(tx):
        model = registry.model(step.model_class)
        if step.operation in ("create", "bulk_create"):
            for row in step.records():
                yield RowWrite(model.name, "insert", row[model.primary_key], row, tx_id)
        else:
            rid = step.conditions[model.primary_key]
            yield RowWrite(model.name, step.operation, rid, step.data if step.operation == "update" else {}, tx_id)


def cache_footprint(tx: Transaction, registry: ModelRegistry) -> dict[str, list]:
    """What ingest put in Redis for this transaction besides its queue entry: the created
    records ("c": [model, id]), its own overlays ("o": [model, id, transaction id]; a create
    whose key the caller gave has one too: every create of a model whose key is not generated,
    and those listed in `overlaid_creates`) and its status ("t"). Removed once the replica has
    replayed it, or when it is discarded."""
    tx_id = tx.transaction_id
    created: list[list[str]] = []
    overlays: list[list[str]] = []
    given_keys = tx.overlaid_creates
    for step in tx.steps:  # (loops, not generators: these run for every transaction the drain claims)
        spec = registry.model(step.model_class)
        if step.operation in ("create", "bulk_create"):
            name, pk, overlaid = spec.name, spec.primary_key, not spec.generated_id
            given = given_keys.get(name) if given_keys and not overlaid else None
            if given:  # (a loop of its own: generated keys, the usual case, pay nothing for it)
                given = set(given)
                for row in step.records():
                    rid = str(row[pk])
                    created.append([name, rid])
                    if rid in given:
                        overlays.append([name, rid, tx_id])
                continue
            for row in step.records():
                created.append([name, str(row[pk])])
                if overlaid:  # ingest put a create entry in the read buffer too
                    overlays.append([name, str(row[pk]), tx_id])
        else:
            overlays.append([spec.name, str(step.conditions[spec.primary_key]), tx_id])
    for name, ids in (tx.cascaded or {}).items():  # what its deletes take or change, overlaid by ingest
        for rid in ids:
            overlays.append([name, rid, tx_id])
    for name, rid, made in tx.rekeyed or ():  # the caches of a key as an earlier ingest filed them
        if made:
            created.append([name, rid])
        overlays.append([name, rid, tx_id])
    return {"c": created, "o": overlays, "t": [tx_id]}


def created_ids(tx: Transaction, registry: ModelRegistry) -> set[str]:
    """The rows this transaction creates, as `record_key`s: others that use them depend on it."""
    out = set()
    for step in tx.steps:
        model = _model_of(step, registry)
        if model is not None and step.operation in ("create", "bulk_create"):
            table, pk, folds = model.table.fullname, model.primary_key, _key_folds(model)
            out.update(record_key(table, row[pk], folds) for row in step.records()
                       if isinstance(row, dict) and pk in row)
    return out


def written_ids(tx: Transaction, registry: ModelRegistry) -> set[str]:
    """The rows this transaction writes (creates, updates or deletes), as `record_key`s, and the
    `existence_key` of each it creates or deletes. While it waits to retry, later transactions
    that use any of them wait behind it: an update held back by a failure must not be overtaken
    by a newer update of the same row, nor a delete by a create of its key again. A step of a
    model the registry lacks (an entry the drain dead-letters as invalid: its model renamed or
    gone from the models file since it was buffered) names the rows it updates or deletes by a
    UUID key, which needs no table: held nothing, its letter let a newer write of the row apply
    first, and retried once the models file was fixed, it wrote the older value over it."""
    created = created_ids(tx, registry)
    out = created | {existence_key(key) for key in created}
    for step in tx.steps:
        if step.operation not in ("update", "delete"):
            continue
        model = _model_of(step, registry)
        if model is not None:
            keys = [record_key(model.table.fullname, v, _key_folds(model)) for v in step.conditions.values()]
        else:  # (its table unknown: another key cannot be named)
            keys = [v.lower() for v in step.conditions.values() if isinstance(v, str) and _looks_like_uuid(v.lower())]
        out.update(keys)
        if step.operation == "delete":
            out.update(map(existence_key, keys))
    return out


def existence_key(key: str) -> str:
    """How a transaction that creates or deletes row `key` holds whether the row exists: a create
    of that key waits behind such a transaction that is retrying (a delete of it: the key is
    taken until the delete applies), but not behind an update of it, which may be what waits for
    that create. (A record_key is a UUID, or a table's name and a key: only a table named
    "exists ..." could meet it.)"""
    return "exists " + key


def claim_rows(holders: dict[str, str], rows: set[str], value: str) -> None:
    """Mark `rows` as held by `value` (a transaction id, "!" + id once dead-lettered), but never
    a row another transaction holds: the first to fail on a row keeps it, and those behind it
    stay behind it. (redis_scripts.HOLD applies the same rule in Redis.)"""
    owner = value.removeprefix("!")
    for row in rows:
        if holders.get(row, owner).removeprefix("!") == owner:
            holders[row] = value


def referenced_ids(tx: Transaction, registry: ModelRegistry) -> set[str]:
    """The rows this transaction uses but does not create, as `record_key`s: those it updates
    or deletes, those its foreign-key columns point at, and any UUID among its other values
    (a reference the schema does not declare). A row it updates or deletes before a step of
    its own creates it (in the order it is applied: steps_in_order) is used too: deleted and
    created again in one transaction, it was another's row until then, which may be waiting
    to retry. And the `existence_key` of each row it creates: a key created again after
    another transaction's delete waits behind that delete if it is retrying (it went to main
    first, failed on the key, and was dead-lettered for that, not as blocked by the delete:
    `failed retry` of the delete left it behind)."""
    refs: set[str] = set()
    first: set[str] = set()  # rows it updates or deletes before it creates them
    created: set[str] = set()
    for step in steps_in_order(tx):
        model = _model_of(step, registry)
        if model is None:
            continue
        table, pk, folds = model.table.fullname, model.primary_key, _key_folds(model)
        creating = step.operation in ("create", "bulk_create")
        for value in step.conditions.values():
            key = record_key(table, value, folds)
            refs.add(key)
            if not creating and key not in created:
                first.add(key)
        if creating:
            created.update(record_key(table, row[pk], folds) for row in step.records()
                           if isinstance(row, dict) and pk in row)
        for row in step.records() if creating else [step.data]:
            if not isinstance(row, dict):
                continue
            for column, value in row.items():
                spec = model.columns.get(column)
                if value is None or column == pk:
                    continue
                if spec is not None and spec.foreign_key:
                    refs.add(record_key(spec.foreign_key, value, spec.foreign_key_folds))
                elif isinstance(value, str) and _looks_like_uuid(value):
                    refs.add(value)
    return (refs - created) | first | {existence_key(key) for key in created}


def record_key(table: str, value: Any, folds: bool = False) -> str:
    """How dependency tracking (and the drain's `held_ids`) names a row: a UUID alone, unique
    across tables; any other key with its table, so that obs unit 5 and another table's row 5
    are not taken for one another. `folds`: a key main compares without case (CITEXT), named
    lower-cased, so that 'abc' names the row 'ABC' (a child naming its failed parent so in
    another case went to main alone). Every letter is folded, as lower() does outside the C
    locale: under it, where only A-Z fold, 'É' and 'é' are two rows taken for one, which at
    worst holds a transaction behind another it did not need to wait for."""
    text = unicode_lower(str(value)) if folds else str(value)
    return text if _looks_like_uuid(text) else f"{table}:{text}"


def _key_folds(model: ModelSpec) -> bool:
    """Does main compare the model's key without case (CITEXT)? See record_key."""
    column = model.columns.get(model.primary_key)
    return column is not None and column.case_insensitive


def _model_of(step: Step, registry: ModelRegistry) -> ModelSpec | None:
    return registry.models.get(step.model_class) if isinstance(step.model_class, str) else None


def _looks_like_uuid(value: str) -> bool:
    return len(value) == 36 and CANONICAL_UUID.fullmatch(value) is not None  # ids are canonical after validation


def new_transaction(endpoint: str, site: str, max_retries: int = DEFAULT_MAX_RETRIES,
                    metadata: dict[str, Any] | None = None) -> Transaction:
    # Transaction(transaction_id, endpoint, site, timestamp, status, retry_count, max_retries, steps,
    # metadata), positional as in from_dict
    return Transaction(new_uuid(), _checked_endpoint(endpoint), site, dt.datetime.now(dt.timezone.utc).isoformat(),
                       "pending", 0, max_retries, [], {} if metadata is None else _checked_metadata(metadata))


def new_uuid() -> str:
    """str(uuid.uuid4()) - 16 random bytes, version 4, RFC 4122 variant - at a third of the
    cost: ingest makes one per created row and one per transaction."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # top two bits 10


def _checked_endpoint(endpoint: Any) -> str:
    """The wire format's `endpoint` is text (the existing system's model reads a str): refused
    at the start of a transaction, as metadata is, not buffered as null, a number or a list."""
    if not isinstance(endpoint, str):
        raise InvalidTransaction(f"endpoint must be a string, not {type(endpoint).__name__}")
    if not endpoint.isascii() or "\x00" in endpoint:  # (a lone surrogate: the JSON writer failed at the end)
        try:
            json_value(endpoint)
        except ValueError as exc:
            raise InvalidTransaction(f"endpoint {endpoint!r}: {exc}") from None
    return endpoint


def _checked_metadata(metadata: Any) -> dict[str, Any]:
    """Refused at the start of a transaction, not in the middle of buffering it (the stdlib
    judges, as for JSON columns: the fast writer would turn NaN into null and datetimes into text silently)."""
    if not isinstance(metadata, dict):
        raise InvalidTransaction(f"metadata must be a dict, not {type(metadata).__name__}")
    try:
        return json_value(metadata)
    except ValueError as exc:
        raise InvalidTransaction(f"metadata: {exc}") from None
