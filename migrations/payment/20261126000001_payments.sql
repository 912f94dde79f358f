-- The payment participant's own database. Money in integer cents.
create table accounts (
    customer_id text primary key,
    balance_cents bigint not null,
    updated_at timestamptz not null default now()
);

create table payments (
    payment_id text primary key,
    saga_id text not null unique,
    customer_id text not null references accounts (customer_id),
    amount_cents bigint not null check (amount_cents >= 0),
    status text not null check (status in ('CHARGED', 'REFUNDED')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
