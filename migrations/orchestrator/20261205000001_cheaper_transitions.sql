-- Cheaper transitions. A saga's context is built when it is read (from its input and its
-- steps' outputs), no longer stored again on every step; a saga's row leaves room on its page
-- for its next version, so a transition that changes no indexed column is a HOT update that
-- writes no index; and the sweep finds its work through indexes of what it asks for: the sagas
-- nobody owns that are due, and this replica's own.
alter table sagas alter column context drop not null;
alter table sagas set (fillfactor = 70);

drop index sagas_by_owner;
drop index sagas_due;
create index sagas_owner_due on sagas (owner, wake_at) where wake_at is not null;
create index sagas_unowned_due on sagas (wake_at) where owner is null and wake_at is not null;
