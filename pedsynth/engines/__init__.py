"""Model runtimes behind small protocols, loaded once per worker process and reused."""
