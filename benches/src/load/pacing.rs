//! Which records go where, and when: the plan of a run (how many batches,
//! which producer sends which, to which partition) and the open-loop
//! schedule (when each batch is due at a fixed rate).
//!
//! Latency under a fixed load is only honest if the load does not wait for
//! the system: a batch is due at `start + n × interval` whatever happened
//! to the batches before it, and its latency is measured from that due
//! time, not from when the sender got round to it (otherwise a stall hides
//! itself by delaying the very sends that would have seen it: coordinated
//! omission).

use std::time::{Duration, Instant};

/// What a run sends: `count` records in batches of `batch`, spread over
/// `producers` and `partitions`. Batch `j` (0-based, in global order) is
/// sent by producer `j % producers` to partition `j % partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Records in the whole run.
    pub count: u64,
    /// Records per batch (the last one may hold fewer).
    pub batch: u64,
    /// Concurrent senders.
    pub producers: u64,
    /// Partitions of the topic.
    pub partitions: u32,
}

impl Plan {
    /// Batches in the run.
    pub fn batches(&self) -> u64 {
        self.count.div_ceil(self.batch.max(1))
    }

    /// Records in batch `j`.
    pub fn batch_len(&self, j: u64) -> u64 {
        let batch = self.batch.max(1);
        batch.min(self.count.saturating_sub(j * batch))
    }

    /// The batches producer `p` sends, in order.
    pub fn producer_batches(&self, p: u64) -> impl Iterator<Item = u64> + use<> {
        (p..self.batches()).step_by(self.producers.max(1) as usize)
    }

    /// The partition batch `j` goes to.
    pub fn partition_of(&self, j: u64) -> u32 {
        (j % u64::from(self.partitions.max(1))) as u32
    }

    /// Records that end up in `partition`.
    pub fn records_in_partition(&self, partition: u32) -> u64 {
        (u64::from(partition)..self.batches())
            .step_by(self.partitions.max(1) as usize)
            .map(|j| self.batch_len(j))
            .sum()
    }

    /// The partitions consumer `c` of `consumers` reads: `c`, `c + consumers`, ...
    pub fn consumer_partitions(&self, c: u32, consumers: u32) -> Vec<u32> {
        (c..self.partitions)
            .step_by(consumers.max(1) as usize)
            .collect()
    }
}

/// When batches are due under a fixed total rate; `None` rate: as fast as
/// possible (closed loop), every batch is due at once.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    /// Time between two consecutive batches of the whole run.
    interval: Option<Duration>,
}

impl Schedule {
    /// A schedule from `start` for `records_per_sec` records per second in
    /// batches of `batch` records.
    pub fn new(start: Instant, records_per_sec: Option<f64>, batch: u64) -> Schedule {
        let interval = records_per_sec
            .filter(|r| *r > 0.0)
            .map(|rate| Duration::from_secs_f64(batch.max(1) as f64 / rate));
        Schedule { start, interval }
    }

    /// When batch `j` (global order, see [`Plan`]) is due; `None` when the
    /// load is not paced.
    pub fn due(&self, j: u64) -> Option<Instant> {
        self.interval.map(|i| self.start + i.mul_f64(j as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_record_once_and_the_last_may_be_short() {
        let plan = Plan {
            count: 2_500,
            batch: 1_000,
            producers: 4,
            partitions: 8,
        };
        assert_eq!(plan.batches(), 3);
        assert_eq!(
            (0..3).map(|j| plan.batch_len(j)).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        let per_partition: Vec<u64> = (0..8).map(|p| plan.records_in_partition(p)).collect();
        assert_eq!(per_partition, [1000, 1000, 500, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn producers_split_the_batches_between_them_without_overlap() {
        let plan = Plan {
            count: 10_000,
            batch: 100,
            producers: 3,
            partitions: 8,
        };
        let mut all: Vec<u64> = (0..3).flat_map(|p| plan.producer_batches(p)).collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(
            plan.producer_batches(1).take(3).collect::<Vec<_>>(),
            [1, 4, 7]
        );
        let total: u64 = (0..8).map(|p| plan.records_in_partition(p)).sum();
        assert_eq!(total, 10_000);
        assert_eq!(plan.consumer_partitions(1, 3), [1, 4, 7]);
        assert_eq!(plan.consumer_partitions(0, 1), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn paced_batches_are_due_at_fixed_intervals_from_the_start() {
        let start = Instant::now();
        // 20,000 records/s in batches of 100: a batch every 5 ms.
        let schedule = Schedule::new(start, Some(20_000.0), 100);
        assert_eq!(schedule.due(0), Some(start));
        assert_eq!(schedule.due(7), Some(start + Duration::from_millis(35)));
        // Due times do not drift with the batch count (no accumulated error).
        let late = schedule.due(200_000).unwrap() - start;
        assert!((late.as_secs_f64() - 1000.0).abs() < 1e-6, "{late:?}");
        assert_eq!(Schedule::new(start, None, 100).due(3), None);
    }
}
