"""One module per source format: declared rules plus a config reader (see conversion.rules)."""
