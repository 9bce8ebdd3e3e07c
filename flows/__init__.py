"""One module per workflow; each exposes module-level functions that take an event id."""
