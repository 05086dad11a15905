//! The pieces of the `sluice-bench` load generator that are plain logic,
//! kept here so they are unit-tested: the run plan and open-loop pacing,
//! the record values, the result and its percentiles, the comparison
//! table, the latency plot, the server's memory and CPU figures and the
//! bytes a topic takes on disk. The binary (`src/bin/sluice-bench`)
//! drives the systems.

pub mod disk;
pub mod pacing;
pub mod payload;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod table;
