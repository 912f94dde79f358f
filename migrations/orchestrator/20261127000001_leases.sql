-- Several sagad replicas on one database. A replica drives a saga only while it is the saga's
-- owner and its own lease is alive; an expired replica id is dead for good (it re-registers
-- under a new id), so its late writes can never pass the fence in the append.

create table replicas (
    replica_id uuid primary key,
    started_at timestamptz not null default now(),
    lease_expires_at timestamptz not null
);

-- The replica driving the saga; null once released (graceful shutdown) or never claimed.
alter table sagas add column owner uuid;

-- The replica that appended the event (null for events written before replicas existed).
alter table saga_events add column replica_id uuid;

create index sagas_by_owner on sagas (owner) where wake_at is not null;
