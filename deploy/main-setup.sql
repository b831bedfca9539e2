-- Main's side of a site, run once on main by the role that ran `obs-pipeline db init` (it owns
-- the tables), after it:  psql -v ON_ERROR_STOP=1 -d obs -f deploy/main-setup.sql
-- Put the site's name where this file says observatory, and passwords of your own.
-- The replica has main's roles: obs_reader logs in there.

-- The drain writes the models' tables and obs_pipeline_applied, nothing else.
CREATE ROLE obs_drain LOGIN PASSWORD 'CHANGE-ME';
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO obs_drain;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO obs_drain;

-- Scripts read the replica (get, search, checks of ids); the drain reads its replay position.
-- pg_read_all_stats lets it read the timeline the replica streams (pg_stat_wal_receiver): without
-- it the drain learns of a failover at the replica's next restartpoint, not at once.
CREATE ROLE obs_reader LOGIN PASSWORD 'CHANGE-ME';
GRANT SELECT ON ALL TABLES IN SCHEMA public TO obs_reader;
GRANT pg_read_all_stats TO obs_reader;

-- The replica's WAL stream (pg_basebackup -U obs_replication ..., README: Running it at a site).
CREATE ROLE obs_replication LOGIN REPLICATION PASSWORD 'CHANGE-ME';

-- Tables `db init` makes later (a model added to OBS_MODELS) get the same grants.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO obs_drain;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO obs_drain;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO obs_reader;

-- Dagster's storage for this site, one database per site (sites sharing one share a run queue).
CREATE DATABASE obs_dagster_observatory OWNER obs_drain;
