//! Client library (in progress).
