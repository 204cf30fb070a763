-- Appends :n dancefinder events to `events`, set-based (run by scripts/gen-events):
--   psql -X -v ON_ERROR_STOP=1 -v n=100000 -f scripts/sql/gen-events.sql
--
-- How it works: every entity gets a lifecycle on a time line t in [0, 1+):
-- bands and dance halls are created at evenly spread times; dance events, origins and
-- ignores start at random times and their follow-ups (update, delete, geocode, remove,
-- unignore) come strictly later. A reference to a band or dance hall only picks one
-- created strictly earlier (or in an earlier run). All rows are sorted by t and the
-- first :n are inserted in that order, so the ids follow the causal order; a prefix
-- in time of a causal history is causal. Inserted in chunks of 50,000 events, one
-- transaction each (several tx values), with tstamp increasing with id.
--
-- Guarantees the checks in projectors.toml and scripts/sql/expected.sql rely on:
--   * each aggregate has exactly one *Created event; events are never updated after
--     their deletion, never deleted twice, never re-created;
--   * a DanceHallGeocoded follows its DanceHallCreated and has numeric lat and lng;
--   * BandIgnored/BandUnignored name a band created earlier whose name is unique for
--     ever ("<prefix> <suffix> <number>"): no BandCreated of that name ever follows;
--     the repeated band names (1 BandCreated in 10 takes one of six names such as
--     "Vikingarna") are never ignored. So the band id found by name is the same whenever it is looked up.
--
-- Deterministic for a given :n and store (the seed comes from the current max id).

\set ON_ERROR_STOP on
SET client_min_messages = warning;

-- `-v user_scale=S` scales the users' preference lifecycles (S = 1 by default; the
-- store of a site where dance events are most of the traffic has few), and
-- `-v f_scale=F` how much more is planned so that :n events remain.
\if :{?user_scale}
\else
\set user_scale 1
\endif
\if :{?f_scale}
\else
\set f_scale 1
\endif

CREATE TEMP TABLE gen_params AS
SELECT :n::bigint AS n,
       50000 AS chunk,
       coalesce((SELECT max(id) FROM events), 0) AS base,
       greatest(coalesce((SELECT max(tstamp) FROM events), '-infinity') + interval '1 second',
                date_trunc('second', now()) - :n * interval '1 second') AS start_time,
       (1.35 + 20.0 / :n) * :f_scale AS f,
       greatest(20, :n / 200)::int AS users;

SELECT setseed(((SELECT base FROM gen_params) % 999983)::float8 / 999983) \gset

CREATE TEMP TABLE gen_counts AS
SELECT ceil(n * 0.02 * f)::int  AS bands,
       ceil(n * 0.005 * f)::int AS halls,
       ceil(n * 0.20 * f)::int  AS events,
       ceil(n * 0.04 * f * :user_scale)::int  AS origins,
       ceil(n * 0.10 * f * :user_scale)::int  AS band_ignores,
       ceil(n * 0.05 * f * :user_scale)::int  AS hall_ignores,
       ceil(n * 0.05 * f * :user_scale)::int  AS city_ignores,
       ceil(n * 0.04 * f * :user_scale)::int  AS municipality_ignores,
       ceil(n * 0.02 * f * :user_scale)::int  AS state_ignores
FROM gen_params;

CREATE TEMP TABLE gen_place (i int PRIMARY KEY, city text, municipality text, state text,
                             lat float8, lng float8);
INSERT INTO gen_place
SELECT row_number() OVER (), * FROM (VALUES
    ('Göteborg', 'Göteborg', 'Västra Götalands län', 57.70887, 11.97456),
    ('Borås', 'Borås', 'Västra Götalands län', 57.72101, 12.94010),
    ('Trollhättan', 'Trollhättan', 'Västra Götalands län', 58.28365, 12.28864),
    ('Skövde', 'Skövde', 'Västra Götalands län', 58.39030, 13.84612),
    ('Alingsås', 'Alingsås', 'Västra Götalands län', 57.93033, 12.53345),
    ('Mölnlycke', 'Härryda', 'Västra Götalands län', 57.65890, 12.11670),
    ('Stockholm', 'Stockholm', 'Stockholms län', 59.32932, 18.06858),
    ('Södertälje', 'Södertälje', 'Stockholms län', 59.19554, 17.62525),
    ('Norrtälje', 'Norrtälje', 'Stockholms län', 59.75800, 18.70490),
    ('Tumba', 'Botkyrka', 'Stockholms län', 59.19940, 17.83390),
    ('Uppsala', 'Uppsala', 'Uppsala län', 59.85856, 17.63893),
    ('Enköping', 'Enköping', 'Uppsala län', 59.63610, 17.07770),
    ('Västerås', 'Västerås', 'Västmanlands län', 59.60990, 16.54480),
    ('Örebro', 'Örebro', 'Örebro län', 59.27530, 15.21340),
    ('Karlstad', 'Karlstad', 'Värmlands län', 59.40216, 13.51150),
    ('Arvika', 'Arvika', 'Värmlands län', 59.65528, 12.58518),
    ('Linköping', 'Linköping', 'Östergötlands län', 58.41081, 15.62137),
    ('Norrköping', 'Norrköping', 'Östergötlands län', 58.58774, 16.19242),
    ('Jönköping', 'Jönköping', 'Jönköpings län', 57.78261, 14.16179),
    ('Värnamo', 'Värnamo', 'Jönköpings län', 57.18604, 14.04000),
    ('Växjö', 'Växjö', 'Kronobergs län', 56.87767, 14.80906),
    ('Kalmar', 'Kalmar', 'Kalmar län', 56.66344, 16.35678),
    ('Malmö', 'Malmö', 'Skåne län', 55.60498, 13.00382),
    ('Helsingborg', 'Helsingborg', 'Skåne län', 56.04673, 12.69437),
    ('Kristianstad', 'Kristianstad', 'Skåne län', 56.02940, 14.15670),
    ('Halmstad', 'Halmstad', 'Hallands län', 56.67446, 12.85780),
    ('Falun', 'Falun', 'Dalarnas län', 60.60650, 15.63550),
    ('Rättvik', 'Rättvik', 'Dalarnas län', 60.88680, 15.11780),
    ('Gävle', 'Gävle', 'Gävleborgs län', 60.67488, 17.14127),
    ('Sundsvall', 'Sundsvall', 'Västernorrlands län', 62.39081, 17.30686),
    ('Östersund', 'Östersund', 'Jämtlands län', 63.17917, 14.63566),
    ('Åre', 'Åre', 'Jämtlands län', 63.39900, 13.08150),
    ('Umeå', 'Umeå', 'Västerbottens län', 63.82584, 20.26304),
    ('Luleå', 'Luleå', 'Norrbottens län', 65.58477, 22.15670),
    ('Visby', 'Gotland', 'Gotlands län', 57.63480, 18.29484),
    ('Eskilstuna', 'Eskilstuna', 'Södermanlands län', 59.36661, 16.50770),
    ('Nyköping', 'Nyköping', 'Södermanlands län', 58.75278, 17.00792),
    ('Karlskrona', 'Karlskrona', 'Blekinge län', 56.16156, 15.58661)
) AS v;

-- Random helpers.
CREATE FUNCTION pg_temp.pick(arr text[]) RETURNS text LANGUAGE sql VOLATILE AS
$$ SELECT arr[1 + floor(random() * array_length(arr, 1))::int] $$;
CREATE FUNCTION pg_temp.place() RETURNS int LANGUAGE sql VOLATILE AS
$$ SELECT 1 + floor(random() * 38)::int $$;
-- A random time in (lo, 1), for something that needs an entity created at lo.
CREATE FUNCTION pg_temp.after(lo float8) RETURNS float8 LANGUAGE sql VOLATILE AS
$$ SELECT greatest(lo, 0) + 1e-9 + random() * (1 - greatest(lo, 0) - 2e-9) $$;
CREATE FUNCTION pg_temp.subject(users int) RETURNS int LANGUAGE sql VOLATILE AS
$$ SELECT 1 + floor(random() * users)::int $$;

-- Everything to insert, on the time line t; tb breaks ties (causes before effects).
CREATE TEMP TABLE gen_plan (t float8 NOT NULL, tb int NOT NULL, aggregate_id uuid NOT NULL,
                            aggregate_name text NOT NULL, name text NOT NULL, data jsonb NOT NULL);

-- Bands ------------------------------------------------------------------------------
-- gen_band: every band name an event may mention, i ordered by creation time t
-- (t = -1: created by an earlier run). gen_band_ignorable: those BandIgnored may name.
CREATE TEMP TABLE gen_new_band AS
SELECT k, (k - 0.5) / c.bands AS t,
       md5('band:' || p.base || ':' || k)::uuid AS id,
       CASE WHEN k % 10 = 0
       -- one BandCreated in ten reuses one of six names
       THEN (ARRAY['Streaplers', 'Vikingarna', 'Lasse Stefanz', 'Thorleifs', 'Sannex',
                   'Arvingarna'])[1 + (k / 10 + p.base) % 6]
       -- the others have a name of their own, for ever (p.base + k is never reused)
       ELSE (ARRAY['Streaplers', 'Vikingarna', 'Lasse Stefanz', 'Thorleifs', 'Sannex',
                   'Arvingarna', 'Casanovas', 'Barbados', 'Titanix', 'Wahlströms', 'Blender',
                   'Scotts', 'Drifters', 'Zekes', 'Larz-Kristerz', 'Kindbergs'])[1 + (k * 7 + p.base) % 16]
            || ' ' ||
            (ARRAY['Orkester', 'Band', 'Trio', 'Kvartett', '& Gänget', 'Kapell', 'Duo',
                   'Express'])[1 + ((k * 13 + p.base) / 16) % 8]
            || ' ' || (p.base + k)
       END AS name,
       k % 10 <> 0 AS ignorable
FROM gen_params p, gen_counts c, generate_series(1, c.bands) k;

INSERT INTO gen_plan
SELECT t, 0, id, 'domain.Band', 'BandCreated', jsonb_build_object('name', name)
FROM gen_new_band;

CREATE TEMP TABLE gen_band AS
SELECT row_number() OVER (ORDER BY t, name)::int AS i, t, name
FROM (SELECT DISTINCT -1::float8 AS t, data->>'name' AS name
      FROM events WHERE name = 'BandCreated' AND data->>'name' IS NOT NULL
      UNION ALL
      SELECT t, name FROM gen_new_band) b;
ALTER TABLE gen_band ADD PRIMARY KEY (i);
CREATE INDEX ON gen_band (t, i);

CREATE TEMP TABLE gen_band_ignorable AS
SELECT row_number() OVER (ORDER BY t, name)::int AS i, t, name
FROM (SELECT -1::float8 AS t, data->>'name' AS name
      FROM events WHERE name = 'BandCreated'
      GROUP BY data->>'name' HAVING count(*) = 1 AND data->>'name' ~ ' [0-9]+$'
      UNION ALL
      SELECT t, name FROM gen_new_band WHERE ignorable) b;
ALTER TABLE gen_band_ignorable ADD PRIMARY KEY (i);
CREATE INDEX ON gen_band_ignorable (t, i);

-- Dance halls ------------------------------------------------------------------------
CREATE TEMP TABLE gen_new_hall AS
SELECT k, (k - 0.5) / c.halls AS t, md5('dancehall:' || p.base || ':' || k)::uuid AS id,
       pg_temp.place() AS place,
       pg_temp.pick(ARRAY['Folkets Park', 'Dansbanan', 'Logen', 'Bygdegården', 'Dansrotundan',
                          'Paviljongen', 'Festplatsen', 'Ladan', 'Brygghuset', 'Sjöpaviljongen'])
           AS word,
       random() < 0.9 AS geocoded, random() AS u1, random() AS u2, random() AS u3
FROM gen_params p, gen_counts c, generate_series(1, c.halls) k;

INSERT INTO gen_plan
SELECT h.t, 0, h.id, 'domain.DanceHall', 'DanceHallCreated',
       jsonb_build_object('name', h.word || ' ' || pl.city, 'city', pl.city,
                          'municipality', pl.municipality, 'state', pl.state)
FROM gen_new_hall h JOIN gen_place pl ON pl.i = h.place;

INSERT INTO gen_plan
SELECT h.t + 0.0001 + 0.002 * h.u1, 1, h.id, 'domain.DanceHall', 'DanceHallGeocoded',
       jsonb_build_object('lat', round((pl.lat + (h.u2 - 0.5) * 0.2)::numeric, 5),
                          'lng', round((pl.lng + (h.u3 - 0.5) * 0.2)::numeric, 5))
FROM gen_new_hall h JOIN gen_place pl ON pl.i = h.place
WHERE h.geocoded;

CREATE TEMP TABLE gen_hall AS
SELECT row_number() OVER (ORDER BY t, id)::int AS i, *
FROM (SELECT DISTINCT ON (aggregate_id) -1::float8 AS t, aggregate_id AS id,
             data->>'name' AS name, data->>'city' AS city,
             data->>'municipality' AS municipality, data->>'state' AS state
      FROM events WHERE name = 'DanceHallCreated' AND data->>'name' IS NOT NULL
      ORDER BY aggregate_id, id DESC) old
UNION ALL
SELECT row_number() OVER (ORDER BY t, id)::int + (SELECT count(DISTINCT aggregate_id)
           FROM events WHERE name = 'DanceHallCreated' AND data->>'name' IS NOT NULL)::int,
       h.t, h.id, h.word || ' ' || pl.city, pl.city, pl.municipality, pl.state
FROM gen_new_hall h JOIN gen_place pl ON pl.i = h.place;
ALTER TABLE gen_hall ADD PRIMARY KEY (i);
CREATE INDEX ON gen_hall (t, i);

ANALYZE gen_band; ANALYZE gen_band_ignorable; ANALYZE gen_hall;

-- Dance events: EventCreated, 0-2 EventUpdated, then EventDeleted for 15% ----------
CREATE TEMP TABLE gen_ev AS
WITH s AS (
    SELECT k, md5('event:' || p.base || ':' || k)::uuid AS id,
           pg_temp.after(greatest((SELECT min(t) FROM gen_band), (SELECT min(t) FROM gen_hall)))
               AS t,
           floor(random() * 3)::int AS updates, random() < 0.15 AS deleted,
           random() AS ub, random() AS uh
    FROM gen_params p, gen_counts c, generate_series(1, c.events) k
)
SELECT s.k, s.id, s.t, s.updates, s.deleted, ab.i AS bands_before,
       1 + floor(s.ub * ab.i)::int AS band, 1 + floor(s.uh * ah.i)::int AS hall
FROM s
CROSS JOIN LATERAL (SELECT i FROM gen_band x WHERE x.t < s.t ORDER BY x.t DESC, x.i DESC LIMIT 1) ab
CROSS JOIN LATERAL (SELECT i FROM gen_hall x WHERE x.t < s.t ORDER BY x.t DESC, x.i DESC LIMIT 1) ah;

-- version 0 is the EventCreated, 1..updates the EventUpdated
CREATE TEMP TABLE gen_ev_version AS
SELECT e.id, v.v, e.hall,
       CASE WHEN v.v = 0 THEN e.t ELSE e.t + 0.01 * (v.v - 0.95 + 0.9 * random()) END AS t,
       CASE WHEN v.v > 0 AND random() < 0.2 THEN 1 + floor(random() * e.bands_before)::int
            ELSE e.band END AS band,
       date '2024-01-01' + floor(e.t * 365)::int
           + CASE WHEN v.v = 0 OR random() < 0.3 THEN floor(random() * 60)::int ELSE 0 END AS day,
       pg_temp.pick(ARRAY['19.00-23.00', '20.00-00.00', '20.00-01.00', '21.00-01.00',
                          '18.00-22.00', '19.30-23.30']) AS hours,
       pg_temp.pick(ARRAY['Dans till levande musik', 'Entré 200 kr', 'Servering',
                          'Allsång i pausen', 'Lotterier', NULL, NULL]) AS extra_info
FROM gen_ev e CROSS JOIN LATERAL generate_series(0, e.updates) v(v);

INSERT INTO gen_plan
SELECT v.t, CASE WHEN v.v = 0 THEN 0 ELSE 1 + v.v END, v.id, 'domain.Event',
       CASE WHEN v.v = 0 THEN 'EventCreated' ELSE 'EventUpdated' END,
       jsonb_strip_nulls(jsonb_build_object(
           'date', v.day, 'time', v.hours, 'band', b.name, 'dance_hall', h.name,
           'city', h.city, 'municipality', h.municipality, 'state', h.state,
           'country', 'Sverige', 'extra_info', v.extra_info))
FROM gen_ev_version v
JOIN gen_band b ON b.i = v.band
JOIN gen_hall h ON h.i = v.hall;

INSERT INTO gen_plan
SELECT e.t + 0.01 * (e.updates + 0.05 + 0.9 * random()), 9, e.id, 'domain.Event',
       'EventDeleted', '{}'::jsonb
FROM gen_ev e WHERE e.deleted;

-- User preferences: a user's events go to its aggregate; data.subject is its subject.
-- Each lifecycle: the add/ignore at t, then the remove/unignore for some of them.
CREATE TEMP TABLE gen_pref AS
SELECT kind, t, t + 0.0001 + 0.05 * random() AS t_undo, random() < undo_p AS undone,
       pg_temp.subject(p.users) AS usr, pg_temp.place() AS place, random() AS u
FROM gen_params p, gen_counts c,
     LATERAL (VALUES ('origin', c.origins, 0.4), ('band', c.band_ignores, 0.3),
                     ('hall', c.hall_ignores, 0.3), ('city', c.city_ignores, 0.3),
                     ('municipality', c.municipality_ignores, 0.3),
                     ('state', c.state_ignores, 0.3)) AS kinds(kind, how_many, undo_p),
     LATERAL (SELECT pg_temp.after(greatest((SELECT min(t) FROM gen_band_ignorable),
                                            (SELECT min(t) FROM gen_hall))) AS t
              FROM generate_series(1, how_many)) s;

CREATE TEMP TABLE gen_pref_data AS
SELECT g.t, g.t_undo, g.undone, md5('user:' || g.usr)::uuid AS aggregate_id,
       CASE g.kind WHEN 'origin' THEN 'Origin' WHEN 'band' THEN 'Band'
                   WHEN 'hall' THEN 'DanceHall' WHEN 'city' THEN 'City'
                   WHEN 'municipality' THEN 'Municipality' ELSE 'State' END AS what,
       jsonb_build_object('subject', md5('subject:' || g.usr)::uuid::text) ||
       CASE g.kind
           WHEN 'origin' THEN jsonb_build_object('origin', pl.city)
           WHEN 'band' THEN jsonb_build_object('band',
               (SELECT b.name FROM gen_band_ignorable b WHERE b.i = 1 + floor(g.u *
                   (SELECT a.i FROM gen_band_ignorable a WHERE a.t < g.t
                    ORDER BY a.t DESC, a.i DESC LIMIT 1))::int))
           WHEN 'hall' THEN jsonb_build_object('dance_hall_id',
               (SELECT h.id::text FROM gen_hall h WHERE h.i = 1 + floor(g.u *
                   (SELECT a.i FROM gen_hall a WHERE a.t < g.t
                    ORDER BY a.t DESC, a.i DESC LIMIT 1))::int))
           WHEN 'city' THEN jsonb_build_object('city', pl.city)
           WHEN 'municipality' THEN jsonb_build_object('municipality', pl.municipality)
           ELSE jsonb_build_object('state', pl.state)
       END AS data,
       CASE WHEN g.kind = 'origin'
            THEN jsonb_build_object('lat', pl.lat, 'lng', pl.lng) ELSE '{}' END AS extra
FROM gen_pref g JOIN gen_place pl ON pl.i = g.place;

INSERT INTO gen_plan
SELECT t, 0, aggregate_id, 'domain.User',
       CASE what WHEN 'Origin' THEN 'OriginAdded' ELSE what || 'Ignored' END, data || extra
FROM gen_pref_data;

INSERT INTO gen_plan
SELECT t_undo, 1, aggregate_id, 'domain.User',
       CASE what WHEN 'Origin' THEN 'OriginRemoved' ELSE what || 'Unignored' END, data
FROM gen_pref_data WHERE undone;

-- The first :n in time order, numbered.
CREATE TEMP TABLE gen_seq AS
SELECT row_number() OVER (ORDER BY t, tb, aggregate_id, name) AS seq,
       aggregate_id, aggregate_name, name, data
FROM gen_plan
ORDER BY t, tb, aggregate_id, name
LIMIT :n;
CREATE INDEX ON gen_seq (seq);

DO $$
DECLARE
    p gen_params;
    c bigint;
BEGIN
    SELECT * INTO p FROM gen_params;
    IF (SELECT count(*) FROM gen_seq) <> p.n THEN
        RAISE EXCEPTION 'planned % events, wanted %', (SELECT count(*) FROM gen_seq), p.n;
    END IF;
    FOR c IN 0 .. (p.n - 1) / p.chunk LOOP
        INSERT INTO events (aggregate_id, aggregate_name, name, data, tstamp)
        SELECT aggregate_id, aggregate_name, name, data,
               p.start_time + (seq - 1) * interval '1 second'
        FROM gen_seq
        WHERE seq > c * p.chunk AND seq <= (c + 1) * p.chunk
        ORDER BY seq;
        COMMIT;
    END LOOP;
END
$$;

SELECT min(id) AS first_id, max(id) AS last_id FROM events WHERE id > (SELECT base FROM gen_params) \gset
\echo :first_id :last_id
