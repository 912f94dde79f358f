-- The order participant's own database: one order per saga.
create table orders (
    order_id text primary key,
    saga_id text not null unique,
    customer_id text not null,
    amount_cents bigint not null,
    status text not null check (status in ('PENDING', 'APPROVED', 'CANCELLED')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
