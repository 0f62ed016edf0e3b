//! System-level tests and benchmarks for Chorus live in `tests/` and `benches/`.
