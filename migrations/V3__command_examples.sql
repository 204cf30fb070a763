-- Read model of the command projector examples/hall_city.py (maintained through psql).
CREATE TABLE hall_city (
    dance_hall  uuid PRIMARY KEY,
    name        text,
    city        text,
    position    bigint NOT NULL
);
