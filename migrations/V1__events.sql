-- The event store of the dancefinder example.
--
-- projectors.toml's [store] maps it: position = id, type = name, data = data,
-- stream = aggregate_id, time = tstamp, transaction = tx.
-- Readers order by (tx, id): a transaction's events become visible together, and
-- reads stop below the oldest running transaction, so no event is ever skipped.
CREATE TABLE events (
    id             bigserial   PRIMARY KEY,
    aggregate_id   uuid        NOT NULL,
    aggregate_name text        NOT NULL,
    name           text        NOT NULL,
    data           jsonb       NOT NULL,
    tstamp         timestamptz NOT NULL DEFAULT now(),
    tx             xid8        NOT NULL DEFAULT pg_current_xact_id()
);

-- The reader's order.
CREATE INDEX events_tx_id ON events (tx, id);
-- Loading one aggregate's stream.
CREATE INDEX events_aggregate_id ON events (aggregate_id, id);

-- Wake live readers (LISTEN events) once per inserting statement.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
