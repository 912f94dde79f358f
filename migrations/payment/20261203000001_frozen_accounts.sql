-- A frozen account takes no refund (RefundPayment is refused, ACCOUNT_FROZEN) until someone
-- unfreezes it: the demo's way to put a saga in FAILED for an operator to fix. Accounts of
-- customers whose id begins with "frozen-" are opened frozen.
alter table accounts add column frozen boolean not null default false;
