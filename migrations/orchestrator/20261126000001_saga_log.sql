-- The saga log (the truth) and the read model kept in the same transaction.

create table sagas (
    saga_id uuid primary key,
    saga_type text not null,
    definition_version integer not null,
    status text not null check (status in ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'FAILED')),
    input jsonb not null,
    context jsonb not null,
    steps jsonb not null,
    failure_reason text,
    -- The seq of the last event: the optimistic-concurrency check of every append.
    version bigint not null,
    correlation_id text not null,
    -- Null when the client gave none: every such start makes a new saga.
    idempotency_key text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- The durable timer: when the saga next needs attention; null once it has ended.
    wake_at timestamptz,
    unique (saga_type, idempotency_key)
);

create index sagas_newest_first on sagas (created_at desc, saga_id desc);
create index sagas_by_type_newest_first on sagas (saga_type, created_at desc, saga_id desc);
create index sagas_due on sagas (wake_at) where wake_at is not null;

create table saga_events (
    saga_id uuid not null references sagas (saga_id),
    seq bigint not null check (seq >= 1),
    event_type text not null,
    step text,
    data jsonb not null,
    recorded_at timestamptz not null default now(),
    primary key (saga_id, seq)
);
