-- Operator tools: a pause that survives restarts, and dead letters that can
-- be applied again.

-- `paused`: play leaves the projector alone, boot leaves it paused; resume
-- puts back the state it had (paused_state).
ALTER TABLE __SCHEMA__.projectors DROP CONSTRAINT IF EXISTS projectors_state_check;
ALTER TABLE __SCHEMA__.projectors ADD CONSTRAINT projectors_state_check
    CHECK (state IN ('booting', 'live', 'finished', 'broken', 'stalled', 'retired', 'paused'));
ALTER TABLE __SCHEMA__.projectors ADD COLUMN paused_state text, ADD COLUMN paused_at timestamptz;

-- A failure that `retry` applied again with success; `retry` records a new
-- failure when it fails again.
ALTER TABLE __SCHEMA__.failures ADD COLUMN resolved_at timestamptz;
CREATE INDEX failures_waiting ON __SCHEMA__.failures (projector, position)
    WHERE dead_letter AND resolved_at IS NULL;
