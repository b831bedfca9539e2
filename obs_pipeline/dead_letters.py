"""The dead-letter list: list, show, retry (in the original order, dependents after the
transaction they depend on) and discard. Used by `obs-pipeline failed` and a Dagster job."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, NamedTuple

import redis

from obs_pipeline import json_codec
from obs_pipeline import redis_scripts as scripts
from obs_pipeline.buffer_store import REPLICATED_STATUS_TTL_S, BufferStore, entry_id, lost_while_watching
from obs_pipeline.config import DAY_S
from obs_pipeline.model_registry import InvalidTransaction, ModelRegistry
from obs_pipeline.wire import (Transaction, cache_footprint, is_storable_id, listed_steps_digest, new_uuid, one_line,
                               validate, written_ids)


class UnknownTransaction(LookupError):
    pass


class CannotBeRetried(ValueError):
    """A dead letter that requeued would only fail again the same way: nothing was changed."""


class ListKeepsChanging(RuntimeError):
    """The dead-letter list changed every time a retry or discard read it: nothing was changed."""


class RedisLostMidChange(RuntimeError):
    """The connection to Redis was lost, or Redis did not answer in time, while a retry or
    discard WATCHed the list: before its MULTI was sent nothing changed; after, Redis may have
    applied it (a `retry --all` of a million letters did, past the CLI's 5 s socket timeout).
    Not tried again: reading the list anew acts on what is left, and says what it did then."""


HANDLE_CHARS = 8  # of a letter's digest in its handle (DeadLetter.handle)
READS = 20  # a retry or discard reads the list at most this often before it gives up, saying why
# Letters per LPUSH when the list is written anew (_remove): one LPUSH of every letter kept passed
# the 1,048,576 arguments Redis takes with a million letters (it resets the connection)
REWRITE_CHUNK = 10_000
# Letters per LRANGE when the list is read (_read_pages): Redis, and every script's ingest, waits
# while it builds a reply, and one LRANGE of 300,000 letters (190 MB) held it 977 ms
LIST_PAGE = 2_000
# The socket timeout a retry or discard gives its MULTI: the client's own plus this per argument
# queued. Redis ran a retry of 50,000 letters (350,000 arguments) in 1.5 s, ~4 us each; a
# million outlasted the CLI's 5 s, and Redis applied what the CLI was told had timed out.
EXEC_S_PER_ARGUMENT = 20e-6
# The health report fits its advice to the kinds of the newest KINDS_READ letters (not_retryable),
# sent whole up to KIND_WHOLE_BYTES each, looked at in Redis up to KINDS_BYTES in all: Redis, and
# every script's ingest, waits meanwhile (1,000 letters of 70 KB: 139 ms at 64 MB, 28 at 8 MB)
KINDS_READ = 1000
KIND_WHOLE_BYTES = 16 * 1024
KINDS_BYTES = 4 * 1024 * 1024


class DeadLetter:
    """A listed letter: its bytes, and what every letter is looked at for (its id, its failure's
    reason and kind); the rest of its document is parsed again when asked for (`doc`), not kept:
    kept parsed, a letter of 1.4 KB held 6.5 KB more, and `failed retry --all` of 200,000 letters
    took 3.3 GB (a backlog dead-lettered whole can be a million)."""

    __slots__ = ("raw", "transaction_id", "reason", "kind")

    def __init__(self, raw: bytes | str, alike: dict[Any, Any] | None = None):
        """`alike`: texts already kept (by _letters), for a reason or kind many letters share."""
        doc = _document(raw)
        self.raw = raw  # as listed: what LREM removes, exactly
        tx_id = doc.get("transaction_id")
        # None for an entry whose id is missing or unusable (`#N` of the list names it)
        self.transaction_id: str | None = tx_id if is_storable_id(tx_id) else None
        failure = _failure_of(doc)
        reason, kind = str(failure.get("reason", "?")), failure.get("kind")
        self.reason: str = alike.setdefault(reason, reason) if alike is not None else reason
        # (any JSON a hand wrote; a text compared with the kinds below)
        self.kind: Any = alike.setdefault(kind, kind) if alike is not None and isinstance(kind, str) else kind

    def __eq__(self, other: object) -> bool:
        """As the letters' bytes (their documents, read from them, then are too)."""
        return self.raw == other.raw if isinstance(other, DeadLetter) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  (as the dataclass it was: mutable, compared by value)

    def __repr__(self) -> str:
        return f"DeadLetter({self.raw!r})"

    @property
    def doc(self) -> dict[str, Any]:
        """Its document, parsed anew at each call (see the class)."""
        return _document(self.raw)

    @property
    def handle(self) -> str:
        """A digest of its bytes, shown beside the place of a letter without a usable id
        (`#2@3f2a9c1e`): the place moves as letters above it leave the list, the digest does not."""
        raw = self.raw if isinstance(self.raw, bytes) else self.raw.encode("utf-8", "surrogateescape")
        return hashlib.sha1(raw).hexdigest()[:HANDLE_CHARS]

    @property
    def failure(self) -> dict[str, Any]:
        """Its `failure` ({} if it has none, or one that is no object: a hand's letter)."""
        return _failure_of(self.doc)

    @property
    def reused_id(self) -> bool:
        """Dead-lettered because a producer reused its id for other steps (see apply.py): its
        status and caches are the applied transaction's (the drain cleans its own with those),
        and it is requeued under a new id."""
        return self.kind == "reused_id"

    @property
    def refused_spool_line(self) -> bool:
        """A spooled line the buffer script could not take for what it is (spool.py): it never
        reached Redis as a transaction, and pushed again it would be refused again."""
        return self.kind == "refused_spool_line"

    def summary(self) -> dict[str, Any]:
        doc = self.doc
        failure = _failure_of(doc)
        return {"transaction_id": self.transaction_id, "endpoint": doc.get("endpoint"),
                "reason": self.reason, "kind": self.kind, "attempts": failure.get("attempts"),
                "failed_at": failure.get("failed_at")}


class Retried(NamedTuple):
    """What a retry did, as its own reading of the list found it."""
    ids: list[str]                 # requeued, in order (a reused id's under its new one)
    left: list[dict[str, Any]]     # a retry of all: the letters it leaves listed, and why (left_listed)
    renamed: list[dict[str, str]]  # requeued under a new id: {transaction_id: the new one, reused_id}


class Discarded(NamedTuple):
    """What a discard did, as its own reading of the list found it."""
    counts: list[int]   # letters dropped per ref (copies of one push are several)
    blocked: list[str]  # the letters left listed that were blocked by one it dropped, as `failed list` names them


class DeadLetters:
    def __init__(self, store: BufferStore, registry: ModelRegistry):
        self.store = store
        self.registry = registry
        self.keys = store.keys

    def list(self, client: Any = None) -> list[DeadLetter]:
        """Oldest failure first (read on `client`: a pipeline that WATCHes the list), LIST_PAGE
        letters per LRANGE. Without `client`, the pages are read under a WATCH of their own and
        read again if the list changed meanwhile (a retry or discard that removed letters would
        shift a page, and a letter be read twice or missed); a list that changed at every read
        (the drain dead-lettering as it goes: new letters at the head, which pages from the
        oldest end do not read) is taken as last read."""
        if client is not None:
            return _letters(_read_pages(client, self.keys.failed))
        try:
            raws, _ = _read_watched(self.store.redis, self.keys.failed, lambda pipe: _read_pages(pipe, self.keys.failed))
        except redis.exceptions.NoPermissionError:  # a monitor's user allowed reads only
            # (no WATCH, MULTI): the pages as they come (`failed list` and `show` exited 1)
            raws = _read_pages(self.store.redis, self.keys.failed)
        return _letters(raws)

    def pages(self) -> Iterator[list[DeadLetter]]:
        """The list oldest first, a page (LIST_PAGE letters) at a time as read, for `failed list`,
        which prints each as it comes (it held every letter, parsed, before the first line: 1.27 GB
        for 200,000). No WATCH, as nothing is read again once printed; the letters the drain pushes
        at the head meanwhile are not read (the count is taken first, the pages from the oldest end)."""
        for page in _raw_pages(self.store.redis, self.keys.failed):
            yield _letters(page)

    def dead(self, tx_ids: set[str]) -> set[str]:
        """Those of `tx_ids` whose status is `failed`: dead-lettered, as their letter is listed
        (a discard deletes the status, a retry makes it `pending`)."""
        ids = sorted(tx_id for tx_id in tx_ids if is_storable_id(tx_id))
        if not ids:
            return set()
        raws = self.store.redis.mget([self.keys.transaction(tx_id) for tx_id in ids])
        return {tx_id for tx_id, raw in zip(ids, raws) if _status(raw) == "failed"}

    def count_and_oldest(self) -> tuple[int, DeadLetter | None]:
        """How many letters are listed, and the oldest, in one round trip without reading the
        list: a backlog dead-lettered whole can be a million letters, gigabytes."""
        with self.store.redis.pipeline(transaction=False) as pipe:
            count, oldest = pipe.llen(self.keys.failed).lindex(self.keys.failed, -1).execute()
        return count, _letters([oldest])[0] if oldest is not None else None

    def get(self, ref: str, letters: list[DeadLetter] | None = None) -> DeadLetter:
        """By transaction id, or `#N@digest` as `failed list` shows an entry that has no usable id
        (`DeadLetter.handle`: one that left the list, or was never there, names nothing), or `#N`:
        the N-th of `list()`. An id comes first: a producer's may be "#2" too, and `failed list`
        shows it as it is."""
        letters = self.list() if letters is None else letters
        for letter in letters:
            if letter.transaction_id == ref:
                return letter
        for letter in letters:  # as `failed list` shows it: a tab or newline in it escaped
            if letter.transaction_id is not None and one_line(letter.transaction_id) == ref:
                return letter
        unescaped = _unescaped(ref)  # as a terminal that is not UTF-8 shows it: `obs-\xf1-1` for obs-ñ-1
        for letter in letters if unescaped not in (None, ref) else ():
            if letter.transaction_id == unescaped:
                return letter
        place, _, digest = ref.partition("@")
        if digest and place.startswith("#") and place[1:].isdigit():
            for letter in letters:
                if letter.transaction_id is None and letter.handle == digest:
                    return letter
            raise UnknownTransaction(f"no dead letter {ref!r} at site {self.keys.site}: it has left the list "
                                     "(see `obs-pipeline failed list`)")
        place_n = _place(ref)
        if place_n is not None and 0 < place_n <= len(letters):
            return letters[place_n - 1]
        if is_storable_id(ref) and self.store.was_discarded(ref):  # (said as such: "no
            # dead-lettered transaction" sent the operator looking for one that another had discarded)
            raise UnknownTransaction(f"transaction {ref!r} of site {self.keys.site} was discarded (`obs-pipeline "
                                     f"failed discard`) within the last {REPLICATED_STATUS_TTL_S / DAY_S:g} days: "
                                     "no letter of it is left; buffer its steps again if they are still wanted")
        raise UnknownTransaction(f"no dead-lettered transaction {ref!r} at site {self.keys.site} "
                                 "(see `obs-pipeline failed list`)")

    def retry(self, transaction_ids: list[str] | None = None) -> list[str]:
        """Requeue these (all when None) plus whatever they blocked, ahead of newer work; returns ids."""
        return self.requeue(transaction_ids).ids

    def requeue(self, transaction_ids: list[str] | None = None) -> "Retried":
        """`retry`, saying also what it left listed and what it renamed, from its own reading of the
        list: worked out from an earlier read, a letter dead-lettered in between was miscounted."""
        prepared: dict[bytes, tuple[str, set[str] | None, str]] = {}  # kept across reads, see _retry
        return self._while_unchanged(lambda pipe: self._retry(pipe, transaction_ids, prepared), "retry")

    def discard(self, refs: list[str]) -> "Discarded":
        """Drop each for good (by id: every letter of that id; or `#N` of the list), with its
        status (its id stays known for a week, SiteKeys.discarded: a copy pushed since is not
        applied), caches, overlays (unless another copy owns them: _owned_elsewhere) and its marks
        in `held_ids`: all named in one reading of the list and dropped in one MULTI, so one that
        names no letter changes nothing (UnknownTransaction), not the ones before it. What they
        blocked stays dead-lettered, named in the result for the operator to retry or discard."""
        return self._while_unchanged(lambda pipe: self._discard(pipe, refs), "discard")

    def _while_unchanged(self, act: Any, action: str) -> Any:
        """Run `act(pipe)`: it reads the list on `pipe`, which WATCHes it, then queues its writes in
        one MULTI, sent here. If the list changed in between (another operator's retry or discard
        of the same letter, a dead letter the drain added), nothing is written and it reads again:
        acting on what it read then would requeue a discarded letter, requeue one twice, or delete
        the status and caches of one queued again. A drain that dead-letters as it goes may change
        it at every read: after READS of them it gives up with one line (it read again for ever).
        A connection lost meanwhile is said as such (RedisLostMidChange), never read again."""
        for _ in range(READS):
            with self.store.redis.pipeline(transaction=True) as pipe:
                sent = False
                try:
                    pipe.watch(self.keys.failed)
                    result = act(pipe)
                    sent = True
                    _execute_patiently(pipe)
                    return result
                except redis.WatchError as error:
                    lost = lost_while_watching(error)
                    if lost is None:
                        continue
                    raise self._lost_line(action, lost, sent) from lost
        raise ListKeepsChanging(f"the dead-letter list of site {self.keys.site} changed each of the {READS} times "
                                "this read it (a drain is dead-lettering as it goes); nothing was changed: stop the "
                                "drain for a moment (the Dagster sensor, `obs-pipeline drain`), then run it again")

    def _lost_line(self, action: str, lost: BaseException, sent: bool) -> RedisLostMidChange:
        """What the operator is told: once the MULTI is sent, whether Redis ran it cannot be known here."""
        what = ("Redis did not answer in time" if isinstance(lost, (redis.TimeoutError, TimeoutError))
                else "the connection to Redis was lost")
        if not sent:
            return RedisLostMidChange(f"{what} ({one_line(lost)}) while the {action} read the dead-letter list of "
                                      f"site {self.keys.site}; nothing was changed: run it again")
        return RedisLostMidChange(f"{what} ({one_line(lost)}) after the {action} was sent to it: Redis may have "
                                  f"applied it; check `obs-pipeline failed list` (site {self.keys.site}) before "
                                  "running it again")

    def _retry(self, pipe: Any, transaction_ids: list[str] | None,
               prepared: dict[bytes, tuple[str, set[str] | None, str]]) -> "Retried":
        """`prepared`: each letter's JSON to queue and rows, by its digest (_digest), worked out once: a
        read that found the list changed costs the next little (4,500 letters took 1.2 s each, and
        a drain dead-lettering every batch changed the list before every one of them ended).
        Queues its writes in `pipe`'s MULTI; _while_unchanged sends it."""
        letters = self.list(pipe)
        if transaction_ids is None:
            chosen = [letter for letter in letters if letter.transaction_id and not letter.refused_spool_line]
        else:
            chosen, wanted, taken = [], set(), set()  # taken: id() of the chosen letters
            for ref in transaction_ids:
                copies = self._meant(ref, letters, "retry")
                if copies[0].refused_spool_line:  # (first: one without a usable id was told only to discard it)
                    raise CannotBeRetried(f"dead letter {ref} is a spooled line Redis could not take, and cannot be "
                                          f"retried: `obs-pipeline failed show {ref}` shows it and why; what was "
                                          f"spooled after it went on without it, so check its rows as they are now, "
                                          f"buffer the steps still wanted again, then `obs-pipeline failed discard "
                                          f"{ref}`")
                if copies[0].transaction_id is None:
                    raise UnknownTransaction(f"dead letter {ref} has no usable transaction id and cannot be "
                                             f"retried: `obs-pipeline failed show {ref}`, then discard it")
                chosen += [copy for copy in copies if id(copy) not in taken]
                taken.update(map(id, copies))
                wanted.add(copies[0].transaction_id)
            # what they blocked, transitively: it failed only because of them
            changed = True
            while changed:
                changed = False
                for letter in letters:
                    blocker = blocked_by(letter)
                    if blocker in wanted and id(letter) not in taken:
                        chosen.append(letter)
                        taken.add(id(letter))
                        wanted.add(letter.transaction_id)
                        changed = True
            self._refuse_blocked(transaction_ids, letters, wanted)
        ordered = _blockers_first(chosen)
        # a letter pushed twice by a producer is requeued once; its copies leave the list with it
        requeued, of_id = [], {}
        for letter in ordered:
            namesakes = of_id.setdefault(letter.transaction_id, [])
            if not any(_copies(letter, other) for other in namesakes):
                namesakes.append(letter)
                requeued.append(letter)
        left_discarded = self._undiscarded(requeued)
        pipe.multi()
        for key, digests in left_discarded.items():  # KEEPTTL: the rest stays discarded as long as it was
            if digests:
                pipe.set(key, " " + " ".join(sorted(digests)), keepttl=True, xx=True)
            else:
                pipe.delete(key)
        _remove(pipe, self.keys.failed, letters, ordered)
        # the JSON queued, not the letters, is what is held while the MULTI is sent (redis-py packs it
        # whole, a copy of every argument): keyed by the letters' bytes, `prepared` held those too
        mine = [_digest(letter.raw) for letter in requeued]
        for letter, key in zip(requeued, mine):
            if key not in prepared:
                prepared[key] = self._requeued(letter)
        # RPUSH puts an entry at the consuming end: push the last-to-run first.
        for key in reversed(mine):
            tx_json, _, tx_id = prepared[key]
            pipe.rpush(self.keys.buffer, tx_json)
            pipe.set(self.keys.transaction(tx_id), tx_json)
        # their dead marks become live holds in the same MULTI: what uses their rows waits behind
        # them (a drain that read a mark as dead meanwhile sees it change, see HoldsChanged); on a
        # row another letter of the id still writes (a producer reused it, and that one stays
        # listed) the dead mark stays, that letter's, right behind the live one (store.revive_ahead).
        # One requeued under a new id takes over its own dead marks only, in their places (the row's
        # head, or its place in the row's queue): a live mark of the id, or a dead one on a row
        # another letter of the id still writes, is the first of the reused id's (it waits to
        # retry, or stays listed), and the requeued one waits behind it
        revived: dict[str, set[str]] = {}
        renamed: list[tuple[str, str, set[str]]] = []  # (new id, old id, its rows)
        for letter, key in zip(requeued, mine):
            _, rows, tx_id = prepared[key]
            if letter.reused_id:
                renamed.append((tx_id, letter.transaction_id, rows or set()))
            elif rows is not None:
                revived.setdefault(letter.transaction_id, set()).update(rows)
        # (a retry of all leaves no letter that writes rows: 1.9 s to find that in a million)
        still_dead = self._rows_still_dead(letters, ordered) if transaction_ids is not None else {}
        self.store.revive({tx_id: rows - still_dead.get(tx_id, set()) for tx_id, rows in revived.items()}, pipe)
        self.store.revive_ahead({tx_id: rows & still_dead.get(tx_id, set()) for tx_id, rows in revived.items()}, pipe)
        if renamed:
            self.store.rename([(new, old, rows - still_dead.get(old, set())) for new, old, rows in renamed], pipe)
            self.store.hold({new: rows & still_dead.get(old, set()) for new, old, rows in renamed}, pipe)
        return Retried(ids=[prepared[key][2] for key in mine],
                       left=left_listed(letters, chosen) if transaction_ids is None else [],
                       renamed=[{"transaction_id": prepared[key][2], "reused_id": letter.transaction_id}
                                for letter, key in zip(requeued, mine) if letter.reused_id])

    def _refuse_blocked(self, refs: list[str], letters: list[DeadLetter], wanted: set[str | None]) -> None:
        """A letter named, blocked by a transaction still listed and not retried with it: its
        blocker's dead mark stays on the row, and requeued it was dead-lettered again at once,
        the retry having said "requeued 1 transaction(s)". Nothing is changed; the line names
        the blocker, whose retry takes it along."""
        listed = {letter.transaction_id for letter in letters} - {None}
        for ref in refs:
            blocker = blocked_by(self.get(ref, letters))
            if blocker is not None and blocker in listed and blocker not in wanted:
                raise CannotBeRetried(f"dead letter {ref} is blocked by {one_line(blocker)}, which is still "
                                      f"dead-lettered: retried alone it would be dead-lettered again behind it; "
                                      f"nothing was changed: `obs-pipeline failed retry {one_line(blocker)}` "
                                      f"requeues both, in order, once its cause is fixed (or `failed discard "
                                      f"{one_line(blocker)}` first)")

    def _requeued(self, letter: DeadLetter) -> tuple[str, set[str] | None, str]:
        """The JSON that requeues the letter, the rows it writes (None: it does not parse), and
        its id: a new one where a producer had reused the id (that one names an applied
        transaction; the original goes into metadata as `reused_id`)."""
        listed = letter.doc  # (parsed once here: DeadLetter keeps only its bytes)
        doc = {k: v for k, v in listed.items() if k != "failure"}
        # last_error: once applied, the drain releases its holds and what is parked behind it
        doc.update(status="pending", retry_count=0)
        if isinstance(doc.get("metadata") or {}, dict):  # (an invalid one stays as it was)
            doc["metadata"] = {**(doc.get("metadata") or {}), "last_error": letter.reason}
        if letter.reused_id:
            doc["transaction_id"] = new_uuid()
            doc["metadata"] = {**doc["metadata"], "reused_id": letter.transaction_id}
        original = _parse(listed)
        return (_canonical_json(doc, _parse(doc)),
                written_ids(original, self.registry) if original is not None else None, doc["transaction_id"])

    def _meant(self, ref: str, letters: list[DeadLetter], action: str) -> list[DeadLetter]:
        """The letter `ref` names, with its copies: one pushed twice by a producer is listed twice, and a
        copy left behind would be requeued by a later `retry --all` (applying what the operator
        discarded) or stay listed after its retry. Letters of the id with other steps (a producer
        reused the id) are not copies: which one the operator means is theirs to say, by place."""
        letter = self.get(ref, letters)
        namesakes = [other for other in letters if other.transaction_id is not None
                     and other.transaction_id == letter.transaction_id] or [letter]
        copies = [other for other in namesakes if _copies(other, letter)]
        if len(copies) == len(namesakes) and letter.transaction_id is not None and _by_place(ref, letter):
            # `failed list` names it by its id, never by this place: a place seen before a letter
            # above it left the list (`discard #1`, then `discard #2`) named the next one, and
            # dropped a transaction the operator never meant
            raise UnknownTransaction(f"{ref} is the place of transaction {one_line(letter.transaction_id)!r}, "
                                     f"which `obs-pipeline failed list` names by its id (places move as letters "
                                     f"leave the list); nothing was changed: {action} it by its id")
        if len(copies) < len(namesakes) and not _by_place(ref, letter):
            places = ", ".join(f"#{letters.index(other) + 1}" for other in namesakes)
            raise UnknownTransaction(f"{len(namesakes)} dead letters under transaction id {ref!r} hold different "
                                     f"steps (a producer reused the id): {action} one by its place in `obs-pipeline "
                                     f"failed list` ({places}), after `failed show #N`")
        return copies

    def _discard(self, pipe: Any, refs: list[str]) -> "Discarded":
        """As _retry: reads on `pipe`, queues the writes in its MULTI."""
        letters = self.list(pipe)
        meant = [self._meant(ref, letters, "discard") for ref in refs]  # all found before any write
        owned_elsewhere = self._owned_elsewhere(pipe, [copies[0] for copies in meant])
        still_dead = self._rows_still_dead(letters, [copy for copies in meant for copy in copies])
        removed, taken = [], set()  # taken: id() of the letters already queued for removal
        # all in one MULTI: a discard that died after removing the letter left its dead marks (every
        # later transaction of its rows dead-lettered as blocked by it) and its caches for ever
        pipe.multi()
        for copies in meant:
            letter = copies[0]
            if id(letter) in taken:  # named twice (by its id and by its place)
                continue
            taken.update(map(id, copies))
            removed += copies
            tx = _parse(letter.doc)
            try:  # a transaction that does not validate was never cached: nothing more to remove
                footprint = cache_footprint(validate(tx, self.registry), self.registry) if tx else None
            except InvalidTransaction:
                footprint = None
            # a reused id's status and caches are the applied one's; a copy's may be too
            its_own = not letter.reused_id and letter.transaction_id not in owned_elsewhere
            if letter.transaction_id and its_own:
                pipe.delete(self.keys.transaction(letter.transaction_id))
                # the id stays known: a copy pushed since (a spooled line whose push's reply was lost,
                # a producer pushing again) was taken for a new transaction, and applied after all
                self.store.remember_discarded(letter.transaction_id, self._steps_digest(letter), pipe)
            for copy in copies:  # a refused spooled line's mark goes with its letter
                digest = copy.doc.get("spool_line_digest")
                if copy.refused_spool_line and isinstance(digest, str):
                    pipe.delete(self.keys.set_aside(digest))
            if tx is not None:  # its dead marks in held_ids: left there, every batch looked them up
                rows = written_ids(tx, self.registry) - still_dead.get(tx.transaction_id, set())
                self.store.unhold({tx.transaction_id: rows}, pipe, dead_only=True)
            if footprint and its_own:
                self.store.forget(footprint, pipe)
        _remove(pipe, self.keys.failed, letters, removed)
        return Discarded([len(copies) for copies in meant], blocked_left(letters, removed))

    def _steps_digest(self, letter: DeadLetter) -> str:
        """Its steps' digest as `discarded:{id}` keeps it (wire.listed_steps_digest, or of the
        steps as listed where they do not parse: the drain digests an invalid copy alike)."""
        tx = _parse(letter.doc)
        return listed_steps_digest(tx, self.registry) if tx is not None else json_codec.digest(letter.doc.get("steps"))

    def _undiscarded(self, requeued: list[DeadLetter]) -> dict[str, set[str]]:
        """By `discarded` key, the digests it keeps once these letters are requeued (those that
        change): a retried letter's steps are the operator's to apply again. Left there (a copy
        of the discarded letter, claimed as the discard landed, was listed again), the drain
        dropped the requeued transaction as a copy of the discarded one, the retry having said it
        requeued it. Written back XX, KEEPTTL: one that expired meanwhile is not made again."""
        ids = sorted({letter.transaction_id for letter in requeued if letter.transaction_id and not letter.reused_id})
        found = self.store.discarded_steps(ids)  # (a discard meanwhile changes the list: WATCHed)
        changed = {}
        for letter in requeued:
            digests = found.get(letter.transaction_id) if not letter.reused_id else None
            if digests and self._steps_digest(letter) in digests:
                digests.discard(self._steps_digest(letter))
                changed[self.keys.discarded(letter.transaction_id)] = digests
        return changed

    def _owned_elsewhere(self, pipe: Any, letters: list[DeadLetter]) -> set[str]:
        """The ids of these letters whose status is not "failed": main applied a copy of the
        transaction (a producer pushed it again, and the copy was dead-lettered as blocked: the
        status stays "applied" or "replicated"), or a live copy waits or is in a batch. That
        status and the caches are that copy's: a discard deleted them (status() said None for
        good). WATCHed with the list: a status that changes before the MULTI has them read again."""
        ids = sorted({letter.transaction_id for letter in letters
                      if letter.transaction_id is not None and not letter.reused_id})
        if not ids:
            return set()
        keys = [self.keys.transaction(tx_id) for tx_id in ids]
        pipe.watch(*keys)
        statuses = pipe.mget(keys)
        return {tx_id for tx_id, raw in zip(ids, statuses) if _status(raw) not in (None, "failed")}

    def _rows_still_dead(self, letters: list[DeadLetter],
                         leaving: list[DeadLetter]) -> dict[str, set[str]]:
        """By id, the rows written by the letters that stay listed under the ids of those
        `leaving` (discarded or retried): a producer that reused an id left letters with other
        steps under it, whose dead marks read alike ("!" + id), and a row one of them still
        holds stays held."""
        gone = {id(letter) for letter in leaving}
        ids = {letter.transaction_id for letter in leaving} - {None}
        rows: dict[str, set[str]] = {}
        for letter in letters:
            if letter.transaction_id not in ids or id(letter) in gone:
                continue
            tx = _parse(letter.doc)
            if tx is not None:
                rows.setdefault(tx.transaction_id, set()).update(written_ids(tx, self.registry))
        return rows


def listed_ids(store: BufferStore) -> set[str]:
    """The transaction ids of the listed letters, for a prune: a letter retried goes back through
    the drain, and where it is a copy of an applied transaction (pushed again by a producer, and
    dead-lettered as blocked by another), that one's record must still be there. Read whole
    (_read_watched): a letter not read would have its record pruned. ListKeepsChanging after
    READS reads that each found the list changed."""
    def read(pipe: Any) -> set[str]:
        return {tx_id for page in _raw_pages(pipe, store.keys.failed) for tx_id in map(entry_id, page)
                if tx_id is not None}

    ids, unchanged = _read_watched(store.redis, store.keys.failed, read)
    if not unchanged:
        raise ListKeepsChanging(f"the dead-letter list of site {store.keys.site} changed each of the {READS} times "
                                "it was read (the drain dead-lettering as it goes?)")
    return ids


def _read_watched(client: Any, key: str, read: Any) -> tuple[Any, bool]:
    """`read(pipe)` of the list at `key` on a pipeline that WATCHes it, done again if the list
    changed meanwhile (a retry or discard that removed letters shifts the pages: a letter read
    twice or missed), at most READS times; the last reading, and whether it was unchanged. The
    letters the drain pushes at the head change it too, though no page from the oldest end moves."""
    for _ in range(READS):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                value = read(pipe)
                pipe.multi()
                pipe.execute()  # an empty MULTI: it fails if the list changed since the WATCH
                return value, True
            except redis.WatchError as error:
                lost = lost_while_watching(error)
                if lost is not None:
                    raise lost from None
    return value, False


def _raw_pages(client: Any, key: str) -> Iterator[list[bytes]]:
    """The list's entries as LRANGE reads them (newest first within a page), LIST_PAGE per call,
    the pages from the oldest end: letters the drain pushes at the head meanwhile move no page
    (and are not read; the count is taken first)."""
    count = client.llen(key)
    for done in range(0, count, LIST_PAGE):
        yield client.lrange(key, -min(done + LIST_PAGE, count), -done - 1)


def _read_pages(client: Any, key: str) -> list[bytes]:
    """The list as LRANGE 0 -1 reads it (newest first), read by _raw_pages."""
    return [raw for page in reversed(list(_raw_pages(client, key))) for raw in page]


def _letters(raws: list[bytes]) -> list[DeadLetter]:
    """The list's entries as read (newest first), oldest first; a reason or kind that many share
    (a backlog dead-lettered whole for one cause) kept once."""
    alike: dict[Any, Any] = {}
    return [DeadLetter(raw, alike) for raw in reversed(raws)]


def _document(raw: bytes | str) -> dict[str, Any]:
    """A letter's document. A byte that is not UTF-8 (a hand's edit, another producer's list) is
    read as a lone surrogate, which `failed list` and `show` escape: one such letter made every
    `failed` command exit with "'utf-8' codec can't decode"."""
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):  # (JSON that is no object, `[1, 2]`, failed every command with
        # "'list' object has no attribute 'get'")
        doc = {"raw": text, "failure": {"reason": "unreadable entry"}}
    return doc


def _failure_of(doc: dict[str, Any]) -> dict[str, Any]:
    """A document's `failure` ({} if it has none, or one that is no object: a hand's letter)."""
    failure = doc.get("failure")
    return failure if isinstance(failure, dict) else {}


def not_retryable(store: BufferStore, most: int = KINDS_READ) -> tuple[int, int, int]:
    """For the health report's advice: of the newest `most` letters (a list of a million letters
    is gigabytes, and a monitor runs `status` every minute), how many were read, how many are
    refused spooled lines and how many have no usable id: `failed retry` refuses both. A letter
    over KIND_WHOLE_BYTES is looked at in Redis (scripts.NEWEST_LETTERS): its kind, not its id."""
    refused = idless = 0
    try:
        read = store.redis.eval(scripts.NEWEST_LETTERS, 1, store.keys.failed, most, KIND_WHOLE_BYTES, KINDS_BYTES)
    except redis.exceptions.NoPermissionError:  # a monitor's Redis user allowed reads only: the report
        return 0, 0, 0  # stands, with the advice of old (the status exited 1 on "no permissions to run 'eval'")
    for code, raw in read:
        letter = _letters([raw])[0] if code == b"W" else None
        if code == b"R" or (letter is not None and letter.refused_spool_line):
            refused += 1
        elif letter is not None and letter.transaction_id is None:
            idless += 1
    return len(read), refused, idless


def _execute_patiently(pipe: Any) -> None:
    """`pipe.execute()`, the socket timeout of its connection raised for it by EXEC_S_PER_ARGUMENT
    per argument queued, then set back (a connection lost meanwhile gets the client's own anew).
    (A redis-py without `update_current_socket_timeout` keeps the client's.)"""
    conn = pipe.connection
    own = getattr(conn, "socket_timeout", None)
    if own is None or not hasattr(conn, "update_current_socket_timeout"):
        pipe.execute()
        return
    conn.update_current_socket_timeout(own + EXEC_S_PER_ARGUMENT * sum(len(args) for args, _ in pipe.command_stack))
    try:
        pipe.execute()
    finally:
        conn.update_current_socket_timeout(own)


def _status(raw: bytes | None) -> str | None:
    """The status in a status key's JSON (None: no key, or one that does not read)."""
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return None
    status = doc.get("status") if isinstance(doc, dict) else None
    return status if isinstance(status, str) else None


def _place(ref: str) -> int | None:
    """N of a `#N` ref, None for any other (no list has 10**18 letters): str.isdigit() takes `²`
    for a digit, and int() refuses it, or 5,000 digits, with a line that named no letter."""
    digits = ref[1:].lstrip("0") if ref.startswith("#") else ""
    return int(digits or "0") if ref[1:].isascii() and ref[1:].isdigit() and len(digits) <= 18 else None


def _by_place(ref: str, letter: DeadLetter) -> bool:
    """Whether `ref` named `letter` by its place (#N), not by its id (see DeadLetters.get)."""
    return letter.transaction_id is None or (ref not in (letter.transaction_id, one_line(letter.transaction_id))
                                             and _unescaped(ref) != letter.transaction_id)


def _unescaped(ref: str) -> str | None:
    """`ref` with its backslash escapes read (`\\xf1`, `\\u20ac`, `\\t`), as `failed list` prints
    what the terminal cannot show; None if it holds a malformed one."""
    import warnings

    try:
        with warnings.catch_warnings():  # an unknown escape ("\\q") is kept as it is
            warnings.simplefilter("ignore", DeprecationWarning)
            return ref.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return None


def _remove(pipe: Any, key: str, letters: list[DeadLetter], removed: list[DeadLetter]) -> None:
    """Queue the removal of `removed` from the list that `letters` read (WATCHed: it is still that
    list). An LREM scans the list, so thousands of them held Redis, and every script's ingest, for
    0.6-3.3 s (`retry --all` of 4,500, measured); past a few, the list is written anew without them,
    REWRITE_CHUNK letters per LPUSH."""
    if len(removed) <= 10:
        for letter in removed:
            pipe.lrem(key, 1, letter.raw)
        return
    gone = {id(letter) for letter in removed}
    kept = [letter.raw for letter in letters if id(letter) not in gone]  # oldest first
    pipe.delete(key)
    for part in range(0, len(kept), REWRITE_CHUNK):  # in the MULTI: the list changes at once
        pipe.lpush(key, *kept[part:part + REWRITE_CHUNK])  # the newest ends at the head


def left_listed(letters: list[DeadLetter], requeued: list[DeadLetter]) -> list[dict[str, Any]]:
    """The letters of `letters` (the list, oldest first) that a retry of all leaves, each named as
    `failed list` shows it once `requeued` are gone (its id, or `#N@digest`, see DeadLetter.handle)
    and why it cannot be retried."""
    gone = {id(letter) for letter in requeued}
    out = []
    for place, letter in enumerate((letter for letter in letters if id(letter) not in gone), start=1):
        ref = one_line(letter.transaction_id) if letter.transaction_id is not None else f"#{place}@{letter.handle}"
        if letter.refused_spool_line:
            why = (f"a spooled line Redis could not take, and would refuse again (`obs-pipeline failed show {ref}`: "
                   "check its rows as they are now, buffer the steps still wanted again, then `obs-pipeline failed "
                   f"discard {ref}`)")
        else:
            why = (f"no usable transaction id, so nothing to requeue it under (`obs-pipeline failed show {ref}`, then "
                   f"`obs-pipeline failed discard {ref}`)")
        out.append({"letter": ref, "transaction_id": letter.transaction_id, "why": why, "reason": letter.reason})
    return out


def blocked_left(letters: list[DeadLetter], removed: list[DeadLetter]) -> list[str]:
    """The letters of `letters` (the list, oldest first) left once `removed` are gone that were
    blocked by an id none of the letters left has, named as `failed list` shows them then."""
    gone = {id(letter) for letter in removed}
    kept = [letter for letter in letters if id(letter) not in gone]
    dropped = {letter.transaction_id for letter in removed} - {letter.transaction_id for letter in kept} - {None}
    return [one_line(letter.transaction_id) if letter.transaction_id is not None else f"#{place}@{letter.handle}"
            for place, letter in enumerate(kept, start=1) if blocked_by(letter) in dropped]


def _parse(doc: dict[str, Any]) -> Transaction | None:
    try:
        return Transaction.from_dict(doc)
    except (InvalidTransaction, TypeError, ValueError):
        return None


def _canonical_json(doc: dict[str, Any], tx: Transaction | None) -> str:
    """Our own serialisation where the document parses (the drain relies on its field order);
    the document as it is otherwise (it will be dead-lettered again, with the reason): metadata
    that is not strict JSON may not be writable our way."""
    if tx is not None:
        try:
            return tx.to_json()
        except (TypeError, ValueError, RecursionError):
            pass
    return json.dumps(doc, separators=(",", ":"))


def _digest(raw: bytes | str) -> bytes:
    """A letter's bytes as `_retry` keeps its work by them: 32 bytes, not the letter's 1.4 KB."""
    return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")).digest()


def _copies(letter: DeadLetter, other: DeadLetter) -> bool:
    """The same transaction, dead-lettered twice (a producer pushed it twice)."""
    return letter is other or (letter.transaction_id is not None and letter.transaction_id == other.transaction_id
                               and letter.doc.get("steps") == other.doc.get("steps"))


def blocked_by(letter: DeadLetter) -> str | None:
    """The id its reason names, for a letter dead-lettered as blocked by another (`blocked by <id>`)."""
    return letter.reason.removeprefix("blocked by ") if letter.reason.startswith("blocked by ") else None


def _blockers_first(letters: list[DeadLetter]) -> list[DeadLetter]:
    """Original order (oldest first), but a transaction always after the one that blocked it
    (after each letter of its id: a producer may have reused it)."""
    by_id: dict[str | None, list[DeadLetter]] = {}
    for letter in letters:
        by_id.setdefault(letter.transaction_id, []).append(letter)
    ordered: list[DeadLetter] = []
    placed: set[int] = set()

    def place(letter: DeadLetter) -> None:
        if id(letter) in placed:
            return
        placed.add(id(letter))
        blocker = blocked_by(letter)
        for first in by_id.get(blocker, []) if blocker is not None else []:
            place(first)
        ordered.append(letter)

    for letter in letters:
        place(letter)
    return ordered
