//! Token bucket (in progress).
