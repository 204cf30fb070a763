-- The dancefinder read models computed set-based, straight from `events`:
--
--   psql -X -v ON_ERROR_STOP=1 -v schema=expected -f scripts/sql/expected.sql
--
-- (Re)creates the schema :schema with the nine tables of migrations/V2__dancefinder.sql
-- (copied from public.*) and fills them with exactly what playing every event in order
-- through the handlers of projectors.toml gives. Compare with
--   (TABLE public.band EXCEPT TABLE expected.band) UNION ALL
--   (TABLE expected.band EXCEPT TABLE public.band)            -- and so on: no rows.
--
-- The order is the reader's, (tx, id), as projectors.toml sets `transaction = "tx"`;
-- `-v order=id` uses id order instead. Both are the same for scripts/gen-events data.
-- `-v position=P` plays only the events up to the one with id P (in that order): the
-- tables of projectors that stand at position P. `-v only=event` computes only the
-- `event` table, from the events of the `event` projector (a benchmark of one projection).
--
-- The handlers and what each table is, as a function of the events in that order:
--   band         upsert on name          -> per name, the last BandCreated
--   dance_hall   upsert on id; geocode   -> per aggregate the last DanceHallCreated, with
--                updates lat/lng           lat/lng of the last DanceHallGeocoded after its
--                                          first DanceHallCreated (earlier ones hit no row)
--   event        upsert on id; update;   -> an aggregate has a row iff an EventCreated follows
--                delete by id              its last EventDeleted; created = the last such
--                                          EventCreated; columns and updated = the last
--                                          EventCreated/EventUpdated from the first such
--                                          EventCreated on (updates of a missing row do nothing)
--   origin, ignored_*: add/ignore upserts (created = the event's time), remove/unignore
--                deletes, by key       -> per key, the last event if it is an add/ignore
--   ignored_band: the key's band_id is found by name in `band`: the band row that exists
--                when the event is played, i.e. the aggregate of the last BandCreated of
--                that name BEFORE the BandIgnored/BandUnignored (none: the event does nothing).
--
-- What this relies on: the `band` table as of each BandIgnored/BandUnignored is the one an
-- ordered replay sees. projectionist only guarantees userpreferences never gets AHEAD of
-- band (`after = ["band"]`); band may be further along. The two agree when no BandCreated
-- of a name follows a BandIgnored/BandUnignored of that name (then the lookup finds the
-- same id however far band has got) and every ignored band is created before it is
-- ignored. scripts/gen-events guarantees both: ignored bands have names of their own that
-- are never created again; repeated band names are never ignored.

\set ON_ERROR_STOP on
\if :{?order}
\else
\set order 'tx, id'
\endif
\if :{?position}
\else
\set position NULL
\endif
\if :{?only}
\else
\set only ''
\endif
SET client_min_messages = warning;
SELECT :'only' = '' AS all_tables \gset

DROP SCHEMA IF EXISTS :"schema" CASCADE;
CREATE SCHEMA :"schema";
CREATE TABLE :"schema".band (LIKE public.band INCLUDING ALL);
CREATE TABLE :"schema".dance_hall (LIKE public.dance_hall INCLUDING ALL);
CREATE TABLE :"schema".event (LIKE public.event INCLUDING ALL);
CREATE TABLE :"schema".origin (LIKE public.origin INCLUDING ALL);
CREATE TABLE :"schema".ignored_band (LIKE public.ignored_band INCLUDING ALL);
CREATE TABLE :"schema".ignored_dance_hall (LIKE public.ignored_dance_hall INCLUDING ALL);
CREATE TABLE :"schema".ignored_city (LIKE public.ignored_city INCLUDING ALL);
CREATE TABLE :"schema".ignored_municipality (LIKE public.ignored_municipality INCLUDING ALL);
CREATE TABLE :"schema".ignored_state (LIKE public.ignored_state INCLUDING ALL);

-- The handled events, numbered in play order (and with -v position=P, only those up to
-- the event with id P in that order: what a projector at position P has played).
DROP TABLE IF EXISTS pg_temp.expected_ev;
CREATE TEMP TABLE expected_ev AS
SELECT row_number() OVER (ORDER BY :order) AS ord, id, aggregate_id, name, data, tstamp
FROM public.events
WHERE name IN ('BandCreated', 'DanceHallCreated', 'DanceHallGeocoded',
               'EventCreated', 'EventUpdated', 'EventDeleted',
               'OriginAdded', 'OriginRemoved', 'BandIgnored', 'BandUnignored',
               'DanceHallIgnored', 'DanceHallUnignored', 'CityIgnored', 'CityUnignored',
               'MunicipalityIgnored', 'MunicipalityUnignored', 'StateIgnored', 'StateUnignored')
       AND (:'only' = '' OR name IN ('EventCreated', 'EventUpdated', 'EventDeleted'))
   OR id = :position;
DELETE FROM expected_ev
WHERE ord > (SELECT ord FROM expected_ev WHERE id = :position)
   OR (id = :position AND name NOT IN ('BandCreated', 'DanceHallCreated', 'DanceHallGeocoded',
               'EventCreated', 'EventUpdated', 'EventDeleted',
               'OriginAdded', 'OriginRemoved', 'BandIgnored', 'BandUnignored',
               'DanceHallIgnored', 'DanceHallUnignored', 'CityIgnored', 'CityUnignored',
               'MunicipalityIgnored', 'MunicipalityUnignored', 'StateIgnored', 'StateUnignored'));
CREATE INDEX ON expected_ev (name);
ANALYZE expected_ev;

\if :all_tables
-- band ---------------------------------------------------------------------------------
INSERT INTO :"schema".band (id, name, created)
SELECT DISTINCT ON (data->>'name') aggregate_id, data->>'name', tstamp
FROM expected_ev
WHERE name = 'BandCreated'
ORDER BY data->>'name', ord DESC;

-- dance_hall ---------------------------------------------------------------------------
INSERT INTO :"schema".dance_hall (id, name, city, municipality, state, latitude, longitude, created)
WITH created AS (
    SELECT DISTINCT ON (aggregate_id) aggregate_id, data, tstamp,
           min(ord) OVER (PARTITION BY aggregate_id) AS first_ord
    FROM expected_ev
    WHERE name = 'DanceHallCreated'
    ORDER BY aggregate_id, ord DESC
), geocoded AS (
    SELECT DISTINCT ON (g.aggregate_id) g.aggregate_id, g.data
    FROM expected_ev g JOIN created c ON c.aggregate_id = g.aggregate_id
    WHERE g.name = 'DanceHallGeocoded' AND g.ord > c.first_ord
    ORDER BY g.aggregate_id, g.ord DESC
)
SELECT c.aggregate_id, c.data->>'name', c.data->>'city', c.data->>'municipality',
       c.data->>'state', (g.data->>'lat')::float8, (g.data->>'lng')::float8, c.tstamp
FROM created c LEFT JOIN geocoded g ON g.aggregate_id = c.aggregate_id;

\endif

-- event --------------------------------------------------------------------------------
INSERT INTO :"schema".event (id, date, time, band, dance_hall, city, municipality, state,
                             country, extra_info, created, updated)
WITH deleted AS (
    SELECT aggregate_id, max(ord) AS ord
    FROM expected_ev WHERE name = 'EventDeleted' GROUP BY aggregate_id
), alive AS (  -- creates and updates after the aggregate's last delete
    SELECT e.*
    FROM expected_ev e LEFT JOIN deleted d ON d.aggregate_id = e.aggregate_id
    WHERE e.name IN ('EventCreated', 'EventUpdated') AND e.ord > coalesce(d.ord, 0)
), created AS (
    SELECT DISTINCT ON (aggregate_id) aggregate_id, tstamp AS created,
           min(ord) OVER (PARTITION BY aggregate_id) AS first_ord
    FROM alive WHERE name = 'EventCreated'
    ORDER BY aggregate_id, ord DESC
), latest AS (
    SELECT DISTINCT ON (a.aggregate_id) a.aggregate_id, a.data, a.tstamp, c.created
    FROM alive a JOIN created c ON c.aggregate_id = a.aggregate_id
    WHERE a.ord >= c.first_ord
    ORDER BY a.aggregate_id, a.ord DESC
)
SELECT aggregate_id, (data->>'date')::date, data->>'time', data->>'band', data->>'dance_hall',
       data->>'city', data->>'municipality', data->>'state', data->>'country',
       data->>'extra_info', created, tstamp
FROM latest;

\if :all_tables
-- origin -------------------------------------------------------------------------------
INSERT INTO :"schema".origin (subject, origin, latitude, longitude, created)
SELECT data->>'subject', data->>'origin', (data->>'lat')::float8, (data->>'lng')::float8, tstamp
FROM (SELECT DISTINCT ON (data->>'subject', data->>'origin') name, data, tstamp
      FROM expected_ev WHERE name IN ('OriginAdded', 'OriginRemoved')
      ORDER BY data->>'subject', data->>'origin', ord DESC) last
WHERE name = 'OriginAdded';

-- ignored_band -------------------------------------------------------------------------
INSERT INTO :"schema".ignored_band (subject, band_id, created)
WITH by_name AS (  -- BandCreated and band (un)ignores of one name, in order
    SELECT ord, name, data, tstamp, aggregate_id, band_name,
           count(*) FILTER (WHERE name = 'BandCreated')
               OVER (PARTITION BY band_name ORDER BY ord) AS creates_so_far
    FROM (SELECT *, CASE name WHEN 'BandCreated' THEN data->>'name' ELSE data->>'band' END AS band_name
          FROM expected_ev
          WHERE name IN ('BandCreated', 'BandIgnored', 'BandUnignored')) e
), looked_up AS (  -- the aggregate of the last BandCreated of the name before each event
    SELECT ord, name, data, tstamp, creates_so_far,
           first_value(aggregate_id) OVER (PARTITION BY band_name, creates_so_far ORDER BY ord)
               AS band_id
    FROM by_name
)
SELECT data->>'subject', band_id, tstamp
FROM (SELECT DISTINCT ON (data->>'subject', band_id) name, data, band_id, tstamp
      FROM looked_up
      WHERE name <> 'BandCreated' AND creates_so_far > 0
      ORDER BY data->>'subject', band_id, ord DESC) last
WHERE name = 'BandIgnored';

-- ignored_dance_hall, ignored_city, ignored_municipality, ignored_state ----------------
INSERT INTO :"schema".ignored_dance_hall (subject, dance_hall_id, created)
SELECT data->>'subject', (data->>'dance_hall_id')::uuid, tstamp
FROM (SELECT DISTINCT ON (data->>'subject', (data->>'dance_hall_id')::uuid) name, data, tstamp
      FROM expected_ev WHERE name IN ('DanceHallIgnored', 'DanceHallUnignored')
      ORDER BY data->>'subject', (data->>'dance_hall_id')::uuid, ord DESC) last
WHERE name = 'DanceHallIgnored';

INSERT INTO :"schema".ignored_city (subject, city, created)
SELECT data->>'subject', data->>'city', tstamp
FROM (SELECT DISTINCT ON (data->>'subject', data->>'city') name, data, tstamp
      FROM expected_ev WHERE name IN ('CityIgnored', 'CityUnignored')
      ORDER BY data->>'subject', data->>'city', ord DESC) last
WHERE name = 'CityIgnored';

INSERT INTO :"schema".ignored_municipality (subject, municipality, created)
SELECT data->>'subject', data->>'municipality', tstamp
FROM (SELECT DISTINCT ON (data->>'subject', data->>'municipality') name, data, tstamp
      FROM expected_ev WHERE name IN ('MunicipalityIgnored', 'MunicipalityUnignored')
      ORDER BY data->>'subject', data->>'municipality', ord DESC) last
WHERE name = 'MunicipalityIgnored';

INSERT INTO :"schema".ignored_state (subject, state, created)
SELECT data->>'subject', data->>'state', tstamp
FROM (SELECT DISTINCT ON (data->>'subject', data->>'state') name, data, tstamp
      FROM expected_ev WHERE name IN ('StateIgnored', 'StateUnignored')
      ORDER BY data->>'subject', data->>'state', ord DESC) last
WHERE name = 'StateIgnored';
\endif

DROP TABLE expected_ev;
