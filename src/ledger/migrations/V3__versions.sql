-- Rebuilds beside the live tables: a projector's versions other than the live
-- one. A `build` is being built in the build schema (at most one per projector
-- at a time); a `previous` version was live once and is kept in the
-- previous-versions schema (its tables renamed name__v{version}) until `prune`
-- drops it, so `rollback` can swap it back in. Both go with their projector's
-- row (retire).
CREATE TABLE __SCHEMA__.versions (
    id              bigserial PRIMARY KEY,
    projector       text NOT NULL REFERENCES __SCHEMA__.projectors (name) ON DELETE CASCADE,
    version         integer NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('build', 'previous')),
    mode            text NOT NULL CHECK (mode IN ('from_beginning', 'from_now', 'once')),
    state           text NOT NULL CHECK (state IN ('booting', 'built', 'broken', 'stalled', 'kept')),
    -- The last event position whose effect is committed in this version's tables.
    position        bigint NOT NULL DEFAULT 0,
    tx              xid8,
    event_time      timestamptz,
    events_processed bigint NOT NULL DEFAULT 0,
    -- Where the build started, and when: its progress and ETA.
    start_position  bigint NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    -- The live tables' names, and where this version's tables are now (same order).
    tables          text[] NOT NULL,
    stored          text[] NOT NULL,
    -- Indexes and sequences renamed on the way into the previous schema: {"schema.name": "original"}.
    renamed         jsonb NOT NULL DEFAULT '{}',
    error           text,
    error_detail    text,
    error_hint      text,
    error_position  bigint,
    error_type      text,
    error_stream    text,
    error_at        timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- When it stopped being live (a previous version).
    kept_since      timestamptz
);
CREATE UNIQUE INDEX versions_one_build ON __SCHEMA__.versions (projector) WHERE kind = 'build';

-- Which of the projector's versions passed them: the live one (version_id
-- NULL) or one of `versions` (a build, a kept previous version). Late events
-- count only for the live version; a swap hands the holes over with it.
ALTER TABLE __SCHEMA__.holes ADD COLUMN version integer, ADD COLUMN version_id bigint;
UPDATE __SCHEMA__.holes h SET version = p.version FROM __SCHEMA__.projectors p WHERE p.name = h.projector;
CREATE INDEX holes_version ON __SCHEMA__.holes (version_id) WHERE version_id IS NOT NULL;

-- The version that failed (a build's failure leaves the live version alone).
ALTER TABLE __SCHEMA__.failures ADD COLUMN version integer;
