"""MLLP (Minimal Lower Layer Protocol): framing, source (server), client and destination."""
