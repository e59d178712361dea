"""Real-time state: shopper profiles, live popularity, the durable event log."""
