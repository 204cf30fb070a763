-- Partitioned projectors: `partitions = N` splits a projector's events by a
-- hash of the stream into N parts, each with its own position here, played
-- concurrently. The record's own position (projectors, or a build's or kept
-- version's row in versions) is the lowest of its parts.
ALTER TABLE __SCHEMA__.projectors ADD COLUMN partitions integer NOT NULL DEFAULT 1;
ALTER TABLE __SCHEMA__.versions ADD COLUMN partitions integer NOT NULL DEFAULT 1;

CREATE TABLE __SCHEMA__.partitions (
    projector        text NOT NULL REFERENCES __SCHEMA__.projectors (name) ON DELETE CASCADE,
    -- The record the part belongs to: NULL for the live one, else a build's
    -- or a kept previous version's row.
    version_id       bigint REFERENCES __SCHEMA__.versions (id) ON DELETE CASCADE,
    partition        integer NOT NULL,
    partitions       integer NOT NULL,
    version          integer NOT NULL,
    -- The last event position of this part whose effect is committed.
    position         bigint NOT NULL DEFAULT 0,
    tx               xid8,
    event_time       timestamptz,
    events_processed bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (partition >= 0 AND partition < partitions)
);
CREATE UNIQUE INDEX partitions_record
    ON __SCHEMA__.partitions (projector, (coalesce(version_id, 0)), partition);

-- The part that passed a hole (NULL: an unpartitioned projector): an event
-- found later in the hole is late only for the part it belongs to.
ALTER TABLE __SCHEMA__.holes ADD COLUMN partition integer, ADD COLUMN partitions integer;

-- How a dead letter was resolved: `retry` applied it, or a `rebuild` of its
-- projector replayed every event (the dead letter's included) into a new
-- read model, so there is nothing left to apply.
ALTER TABLE __SCHEMA__.failures ADD COLUMN resolved_by text;
UPDATE __SCHEMA__.failures SET resolved_by = 'retry' WHERE resolved_at IS NOT NULL;
