"""A change-event relay for Django on PostgreSQL: the transactional outbox."""
