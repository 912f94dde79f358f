-- What the explorer looks up without a scan of every saga.
-- A saga by its correlation id or its idempotency key alone (the unique index starts with the
-- saga type). Both are set when the saga starts and never change, so a transition stays a HOT
-- update; sagas without either cost no index entry.
create index sagas_by_correlation_id on sagas (correlation_id) where correlation_id <> '';
create index sagas_by_idempotency_key on sagas (idempotency_key) where idempotency_key is not null;
-- The FAILED sagas, which wait for a person (the stuck ones are in sagas_failing). A saga enters
-- or leaves this index only when it ends or is retried, transitions that change wake_at too.
create index sagas_failed on sagas (updated_at) where status = 'FAILED';
