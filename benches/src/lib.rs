//! Shared fixtures for Sluice benchmarks.
