-- Passed holes are recorded per projector, one row per batch that passed any.
-- The holes of a batch are kept as runs: the run i is n[i] holes of len[i]
-- positions, the first at lo[i], each next one stride[i] positions further
-- (a sequence INCREMENT BY 1000 makes one run per batch, however many holes).
-- An event that later appears inside a hole a projector already passed is a
-- late event: it is looked up by these rows, reported, and remembered in
-- late_events (so it is alerted once). Both go with their projector's row
-- (retire). A rebuild forgets its late events and hands its holes over to no
-- projector (projector NULL): they stay known to be passable, but are no
-- longer the rebuilt projector's to check.

CREATE TEMP TABLE projectionist_holes_v1 ON COMMIT DROP AS SELECT * FROM __SCHEMA__.holes;
DROP TABLE __SCHEMA__.holes;

CREATE TABLE __SCHEMA__.holes (
    id              bigserial PRIMARY KEY,
    projector       text REFERENCES __SCHEMA__.projectors (name) ON DELETE CASCADE,
    -- The first and last position of any hole of the batch.
    first_position  bigint NOT NULL,
    last_position   bigint NOT NULL,
    lo              bigint[] NOT NULL,
    len             bigint[] NOT NULL,
    stride          bigint[] NOT NULL,
    n               bigint[] NOT NULL,
    first_seen      timestamptz NOT NULL,
    passed_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holes_projector ON __SCHEMA__.holes (projector, first_position);
-- A hole any projector passed is known to be passable (only a late event can
-- fill it): a rebuild passes it at once.
CREATE INDEX holes_span ON __SCHEMA__.holes USING gist (int8range(first_position, last_position, '[]'));

-- Holes recorded before: every projector at or past them had passed them.
INSERT INTO __SCHEMA__.holes (projector, first_position, last_position, lo, len, stride, n, first_seen, passed_at)
SELECT p.name, h.first_position, h.last_position, ARRAY[h.first_position],
       ARRAY[h.last_position - h.first_position + 1], ARRAY[0::bigint], ARRAY[1::bigint],
       h.first_seen, h.passed_at
FROM projectionist_holes_v1 h
JOIN __SCHEMA__.projectors p ON p.position >= h.last_position AND p.tx IS NULL;

CREATE TABLE __SCHEMA__.late_events (
    projector       text NOT NULL REFERENCES __SCHEMA__.projectors (name) ON DELETE CASCADE,
    position        bigint NOT NULL,
    type            text,
    found_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, position)
);
