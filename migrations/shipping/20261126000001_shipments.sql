-- The shipping participant's own database: one shipment per saga.
create table shipments (
    shipment_id text primary key,
    saga_id text not null unique,
    order_id text not null,
    country text not null,
    status text not null check (status in ('SCHEDULED', 'CANCELLED')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create index shipments_by_order on shipments (order_id, created_at desc);
