//! The pieces of the `sluice-bench` load generator that are plain logic,
//! kept here so they are unit-tested: the run plan and open-loop pacing,
//! the result and its percentiles, the comparison table, the latency plot
//! and the server's memory figure. The binary (`src/bin/sluice-bench`)
//! drives the systems.

pub mod pacing;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod table;
