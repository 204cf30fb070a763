-- A slow, obviously-correct oracle: plays every event, one by one in (tx, id) order,
-- through the handlers of projectors.toml into the schema :schema (recreated, tables
-- copied from public.*), with the placeholders replaced by hand:
--   :position $1  :type $2  :stream $3 (text)  :time $4  :data $5  :data.a.b ($5 #>> '{a,b}')
--
--   psql -X -v ON_ERROR_STOP=1 -v schema=replay -f scripts/sql/replay-reference.sql
--
-- GENERATED from projectors.toml (mechanically, the SQL is the manifest's): regenerate it
-- when the handlers change. Used to check scripts/sql/expected.sql (EXCEPT both ways on
-- the nine tables gives no rows). About 20,000 events/s.

\set ON_ERROR_STOP on
SET client_min_messages = warning;
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
SET search_path = :"schema";

DO $replay$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT id, name, aggregate_id::text AS stream, tstamp, data
             FROM public.events ORDER BY tx, id
    LOOP
        CASE e.name
        WHEN 'BandCreated' THEN
            -- projector band
            EXECUTE $q$INSERT INTO band (id, name, created) VALUES ($3::uuid, ($5 #>> '{name}'), $4)
                    ON CONFLICT (name) DO UPDATE SET id = EXCLUDED.id, created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'DanceHallCreated' THEN
            -- projector dancehall
            EXECUTE $q$INSERT INTO dance_hall (id, name, city, municipality, state, created)
                    VALUES ($3::uuid, ($5 #>> '{name}'), ($5 #>> '{city}'), ($5 #>> '{municipality}'), ($5 #>> '{state}'), $4)
                    ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, city = EXCLUDED.city,
                        municipality = EXCLUDED.municipality, state = EXCLUDED.state, created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'DanceHallGeocoded' THEN
            -- projector dancehall
            EXECUTE $q$UPDATE dance_hall SET latitude = ($5 #>> '{lat}')::float8, longitude = ($5 #>> '{lng}')::float8
                    WHERE id = $3::uuid$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'EventCreated' THEN
            -- projector event
            EXECUTE $q$INSERT INTO event (id, date, time, band, dance_hall, city, municipality, state, country,
                                       extra_info, created, updated)
                    VALUES ($3::uuid, ($5 #>> '{date}')::date, ($5 #>> '{time}'), ($5 #>> '{band}'), ($5 #>> '{dance_hall}'), ($5 #>> '{city}'),
                            ($5 #>> '{municipality}'), ($5 #>> '{state}'), ($5 #>> '{country}'), ($5 #>> '{extra_info}'), $4, $4)
                    ON CONFLICT (id) DO UPDATE SET date = EXCLUDED.date, time = EXCLUDED.time,
                        band = EXCLUDED.band, dance_hall = EXCLUDED.dance_hall, city = EXCLUDED.city,
                        municipality = EXCLUDED.municipality, state = EXCLUDED.state, country = EXCLUDED.country,
                        extra_info = EXCLUDED.extra_info, created = EXCLUDED.created, updated = EXCLUDED.updated$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'EventUpdated' THEN
            -- projector event
            EXECUTE $q$UPDATE event SET date = ($5 #>> '{date}')::date, time = ($5 #>> '{time}'), band = ($5 #>> '{band}'),
                        dance_hall = ($5 #>> '{dance_hall}'), city = ($5 #>> '{city}'), municipality = ($5 #>> '{municipality}'),
                        state = ($5 #>> '{state}'), country = ($5 #>> '{country}'), extra_info = ($5 #>> '{extra_info}'),
                        updated = $4
                    WHERE id = $3::uuid$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'EventDeleted' THEN
            -- projector event
            EXECUTE $q$DELETE FROM event WHERE id = $3::uuid$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'OriginAdded' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO origin (subject, origin, latitude, longitude, created)
                    VALUES (($5 #>> '{subject}'), ($5 #>> '{origin}'), ($5 #>> '{lat}')::float8, ($5 #>> '{lng}')::float8, $4)
                    ON CONFLICT (subject, origin) DO UPDATE SET latitude = EXCLUDED.latitude,
                        longitude = EXCLUDED.longitude, created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'OriginRemoved' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM origin WHERE subject = ($5 #>> '{subject}') AND origin = ($5 #>> '{origin}')$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'BandIgnored' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO ignored_band (subject, band_id, created)
                    SELECT ($5 #>> '{subject}')::text, b.id, $4::timestamptz FROM band b WHERE b.name = ($5 #>> '{band}')
                    ON CONFLICT (subject, band_id) DO UPDATE SET created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'BandUnignored' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM ignored_band
                    WHERE subject = ($5 #>> '{subject}') AND band_id IN (SELECT b.id FROM band b WHERE b.name = ($5 #>> '{band}'))$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'DanceHallIgnored' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO ignored_dance_hall (subject, dance_hall_id, created)
                    VALUES (($5 #>> '{subject}'), ($5 #>> '{dance_hall_id}')::uuid, $4)
                    ON CONFLICT (subject, dance_hall_id) DO UPDATE SET created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'DanceHallUnignored' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM ignored_dance_hall
                    WHERE subject = ($5 #>> '{subject}') AND dance_hall_id = ($5 #>> '{dance_hall_id}')::uuid$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'CityIgnored' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO ignored_city (subject, city, created) VALUES (($5 #>> '{subject}'), ($5 #>> '{city}'), $4)
                    ON CONFLICT (subject, city) DO UPDATE SET created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'CityUnignored' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM ignored_city WHERE subject = ($5 #>> '{subject}') AND city = ($5 #>> '{city}')$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'MunicipalityIgnored' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO ignored_municipality (subject, municipality, created)
                    VALUES (($5 #>> '{subject}'), ($5 #>> '{municipality}'), $4)
                    ON CONFLICT (subject, municipality) DO UPDATE SET created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'MunicipalityUnignored' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM ignored_municipality WHERE subject = ($5 #>> '{subject}') AND municipality = ($5 #>> '{municipality}')$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'StateIgnored' THEN
            -- projector userpreferences
            EXECUTE $q$INSERT INTO ignored_state (subject, state, created) VALUES (($5 #>> '{subject}'), ($5 #>> '{state}'), $4)
                    ON CONFLICT (subject, state) DO UPDATE SET created = EXCLUDED.created$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        WHEN 'StateUnignored' THEN
            -- projector userpreferences
            EXECUTE $q$DELETE FROM ignored_state WHERE subject = ($5 #>> '{subject}') AND state = ($5 #>> '{state}')$q$
                USING e.id, e.name, e.stream, e.tstamp, e.data;
        ELSE NULL;
        END CASE;
    END LOOP;
END
$replay$;

RESET search_path;
