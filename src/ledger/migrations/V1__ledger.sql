-- projectionist's ledger: one row per projector, its failures, and passed holes.
-- __SCHEMA__ is replaced by the quoted ledger schema ([ledger] schema, default projectionist).

CREATE TABLE __SCHEMA__.projectors (
    name            text PRIMARY KEY,
    mode            text NOT NULL CHECK (mode IN ('from_beginning', 'from_now', 'once')),
    state           text NOT NULL CHECK (state IN ('booting', 'live', 'finished', 'broken', 'stalled', 'retired')),
    -- The last event position whose effect is committed.
    position        bigint NOT NULL DEFAULT 0,
    -- With [store].transaction: the transaction id of that event (order is (tx, position)).
    tx              xid8,
    -- Time of the last processed event (for BEHIND).
    event_time      timestamptz,
    version         integer NOT NULL DEFAULT 1,
    side_effects    boolean NOT NULL DEFAULT false,
    -- Owned tables, remembered so status and retire work after the manifest forgot them.
    tables          text[] NOT NULL DEFAULT '{}',
    events_processed bigint NOT NULL DEFAULT 0,
    error           text,
    error_detail    text,
    error_hint      text,
    error_position  bigint,
    error_type      text,
    error_stream    text,
    error_at        timestamptz,
    -- When boot or play first saw it missing from the manifest.
    missing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every handler failure (and, with on_error = "skip", the dead letters).
CREATE TABLE __SCHEMA__.failures (
    id              bigserial PRIMARY KEY,
    projector       text NOT NULL,
    run             text NOT NULL,
    position        bigint NOT NULL,
    type            text,
    stream          text,
    error           text NOT NULL,
    detail          text,
    hint            text,
    sqlstate        text,
    dead_letter     boolean NOT NULL DEFAULT false,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON __SCHEMA__.failures (projector, at DESC);

-- Holes in the positions that were passed once no transaction could fill them any more.
CREATE TABLE __SCHEMA__.holes (
    first_position  bigint PRIMARY KEY,
    last_position   bigint NOT NULL,
    first_seen      timestamptz NOT NULL,
    passed_at       timestamptz NOT NULL DEFAULT now()
);
