"""One module per vendor; each wraps the vendor's client with timeouts and the retry policy."""
