-- Read models of the dancefinder example (see examples/dancefinder/README.md).
-- No foreign keys: every projector can be reset on its own. The keys below are
-- what the handlers in projectors.toml upsert and delete by.

-- projector band: BandCreated. A later BandCreated with the same name wins.
CREATE TABLE band (
    name    text        NOT NULL PRIMARY KEY,
    id      uuid        NOT NULL,
    created timestamptz NOT NULL
);
CREATE INDEX band_id ON band (id);

-- projector dancehall: DanceHallCreated, DanceHallGeocoded.
CREATE TABLE dance_hall (
    id           uuid        NOT NULL PRIMARY KEY,
    name         text        NOT NULL,
    city         text,
    municipality text,
    state        text,
    latitude     float8,
    longitude    float8,
    created      timestamptz NOT NULL
);

-- projector event: EventCreated, EventUpdated, EventDeleted.
CREATE TABLE event (
    id           uuid        NOT NULL PRIMARY KEY,
    date         date        NOT NULL,
    time         text,
    band         text        NOT NULL,
    dance_hall   text        NOT NULL,
    city         text,
    municipality text,
    state        text,
    country      text,
    extra_info   text,
    created      timestamptz NOT NULL,
    updated      timestamptz NOT NULL
);
CREATE INDEX event_date ON event (date);

-- projector userpreferences: the six tables below.
CREATE TABLE origin (
    subject   text        NOT NULL,
    origin    text        NOT NULL,
    latitude  float8,
    longitude float8,
    created   timestamptz NOT NULL,
    PRIMARY KEY (subject, origin)
);

CREATE TABLE ignored_band (
    subject text        NOT NULL,
    band_id uuid        NOT NULL,
    created timestamptz NOT NULL,
    PRIMARY KEY (subject, band_id)
);

CREATE TABLE ignored_dance_hall (
    subject       text        NOT NULL,
    dance_hall_id uuid        NOT NULL,
    created       timestamptz NOT NULL,
    PRIMARY KEY (subject, dance_hall_id)
);

CREATE TABLE ignored_city (
    subject text        NOT NULL,
    city    text        NOT NULL,
    created timestamptz NOT NULL,
    PRIMARY KEY (subject, city)
);

CREATE TABLE ignored_municipality (
    subject      text        NOT NULL,
    municipality text        NOT NULL,
    created      timestamptz NOT NULL,
    PRIMARY KEY (subject, municipality)
);

CREATE TABLE ignored_state (
    subject text        NOT NULL,
    state   text        NOT NULL,
    created timestamptz NOT NULL,
    PRIMARY KEY (subject, state)
);
