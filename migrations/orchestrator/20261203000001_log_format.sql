-- The stored log is a format with a version: each event says which format it was written in,
-- so every later release knows how to read it. The events written before this column existed
-- are format 1.
alter table saga_events add column format smallint not null default 1;
