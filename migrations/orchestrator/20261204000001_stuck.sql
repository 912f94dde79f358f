-- Stuck sagas: since when the step a running or compensating saga works on has kept failing
-- (null while it is not failing, and once the saga has ended). A saga is stuck when this is
-- older than sagad's --stuck-after; the partial index finds those without a scan of every saga.
alter table sagas add column failing_since timestamptz;

create index sagas_failing on sagas (failing_since) where failing_since is not null;
