"""PostgreSQL WAL positions ("16/B374D848") as integers, so they compare and sort."""


def lsn_to_int(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# How far a standby has replayed main's WAL; NULL on a server that is not in recovery. (Alone,
# pg_last_wal_replay_lsn() answers on a primary too once it has crash-recovered: the static
# end of that recovery, which would pass for a replica's position.)
REPLAY_LSN_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END"
# ... and the replica's system identifier: a standby of another cluster has a replay position
# too, of other WAL (see ReplicaDatabase.replay_lsn).
REPLAY_SQL = REPLAY_LSN_SQL + ", (SELECT system_identifier FROM pg_control_system())"
# ... and the timeline it replays, which main's must be (a failover or a restore forks one: the
# same LSNs, other WAL): its WAL receiver's (NULL while it does not stream, or to a role without
# pg_read_all_stats), else that of its last restartpoint (behind a timeline switch until the next).
REPLAY_TIMELINE_SQL = (REPLAY_SQL + ", COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), "
                       "(SELECT timeline_id FROM pg_control_checkpoint()))")

# The timeline main writes, as the name of its current WAL file ("00000002000000000000001A": its
# first 8 hex digits); NULL on a standby. pg_control_checkpoint()'s lags a promotion until the
# next checkpoint, which would hide a failover's fork (see apply._SESSION_SQL).
MAIN_TIMELINE_EXPRESSION = "CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_insert_lsn()) END"
# When main's server started, in microseconds since the epoch. Two standbys of one primary
# promoted in turn (the second never followed the first) both write timeline 2 of its cluster,
# with other WAL past their fork: the timeline's number does not tell them apart, the server's
# start does (so does a restart, which loses no flushed commit: the drain then asks main once).
MAIN_STARTED_EXPRESSION = "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8"


def timeline_of_wal_file(name: str | None) -> int | None:
    """The timeline in a WAL file's name (MAIN_TIMELINE_EXPRESSION's answer), None for none."""
    return int(name[:8], 16) if name else None
