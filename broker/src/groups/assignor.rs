//! The broker-side assignor: which member of a group reads which partition.
//!
//! Balanced per topic and sticky: a partition stays with its current owner
//! unless that owner has more than its share, so a rebalance moves as few
//! partitions as it can. Deterministic for the same input.

use std::collections::{BTreeMap, BTreeSet};

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What the assignor needs to know about a member.
#[derive(Debug, Clone)]
pub struct MemberSubscription<'a> {
    pub member_id: &'a str,
    pub topics: &'a BTreeSet<String>,
    /// Its current target assignment, kept where possible.
    pub current: &'a BTreeSet<TopicPartition>,
}

/// Computes the target assignment. `partitions` gives each topic's partition
/// count; subscribed topics missing from it are skipped (they do not exist).
///
/// For each topic, its subscribers share its partitions: each gets
/// `n / k` or `n / k + 1`. Members first keep what they had (up to their
/// share), then the rest goes to the subscribers with the fewest.
pub fn assign(
    members: &[MemberSubscription<'_>],
    partitions: &BTreeMap<String, u32>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut result: BTreeMap<String, BTreeSet<TopicPartition>> = members
        .iter()
        .map(|m| (m.member_id.to_owned(), BTreeSet::new()))
        .collect();
    for (topic, &count) in partitions {
        let mut subscribers: Vec<&MemberSubscription<'_>> = members
            .iter()
            .filter(|m| m.topics.contains(topic))
            .collect();
        if subscribers.is_empty() || count == 0 {
            continue;
        }
        subscribers.sort_by_key(|m| m.member_id);
        let k = subscribers.len() as u32;
        let (base, extra) = (count / k, count % k);
        // Members that already hold more get the `+1` shares first, so
        // fewer partitions move.
        let mut by_holdings: Vec<(usize, &MemberSubscription<'_>)> = subscribers
            .iter()
            .map(|m| {
                let held = m
                    .current
                    .iter()
                    .filter(|tp| &tp.topic == topic && tp.partition < count)
                    .count();
                (held, *m)
            })
            .collect();
        by_holdings.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.member_id.cmp(b.1.member_id)));
        let quota: BTreeMap<&str, u32> = by_holdings
            .iter()
            .enumerate()
            .map(|(i, (_, m))| (m.member_id, base + u32::from((i as u32) < extra)))
            .collect();
        let mut taken = vec![false; count as usize];
        let mut load: BTreeMap<&str, u32> = BTreeMap::new();
        for m in &subscribers {
            let mut kept = 0;
            for tp in m
                .current
                .iter()
                .filter(|tp| &tp.topic == topic && tp.partition < count)
            {
                if kept < quota[m.member_id] && !taken[tp.partition as usize] {
                    taken[tp.partition as usize] = true;
                    result
                        .get_mut(m.member_id)
                        .expect("member")
                        .insert(tp.clone());
                    kept += 1;
                }
            }
            load.insert(m.member_id, kept);
        }
        for partition in 0..count {
            if taken[partition as usize] {
                continue;
            }
            let member = subscribers
                .iter()
                .filter(|m| load[m.member_id] < quota[m.member_id])
                .min_by_key(|m| (load[m.member_id], m.member_id))
                .expect("quotas add up to the partition count");
            *load.get_mut(member.member_id).expect("member") += 1;
            result
                .get_mut(member.member_id)
                .expect("member")
                .insert(TopicPartition::new(topic.clone(), partition));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn run(
        members: &[(&str, BTreeSet<String>, BTreeSet<TopicPartition>)],
        partitions: &[(&str, u32)],
    ) -> BTreeMap<String, BTreeSet<TopicPartition>> {
        let subs: Vec<MemberSubscription<'_>> = members
            .iter()
            .map(|(id, t, c)| MemberSubscription {
                member_id: id,
                topics: t,
                current: c,
            })
            .collect();
        let partitions = partitions
            .iter()
            .map(|(t, n)| (t.to_string(), *n))
            .collect();
        assign(&subs, &partitions)
    }

    fn check_complete_and_balanced(
        result: &BTreeMap<String, BTreeSet<TopicPartition>>,
        count: u32,
    ) {
        let all: Vec<&TopicPartition> = result.values().flatten().collect();
        assert_eq!(all.len(), count as usize, "every partition once");
        let set: BTreeSet<_> = all.iter().collect();
        assert_eq!(set.len(), all.len(), "no partition twice");
        let sizes: Vec<usize> = result.values().map(|s| s.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn spreads_evenly_and_moves_little_when_a_member_leaves_or_joins() {
        let t = topics(&["orders"]);
        let none = BTreeSet::new();
        let first = run(
            &[
                ("a", t.clone(), none.clone()),
                ("b", t.clone(), none.clone()),
                ("c", t.clone(), none.clone()),
            ],
            &[("orders", 6)],
        );
        check_complete_and_balanced(&first, 6);
        // c leaves: a and b keep theirs and split c's.
        let second = run(
            &[
                ("a", t.clone(), first["a"].clone()),
                ("b", t.clone(), first["b"].clone()),
            ],
            &[("orders", 6)],
        );
        check_complete_and_balanced(&second, 6);
        assert!(first["a"].is_subset(&second["a"]));
        assert!(first["b"].is_subset(&second["b"]));
        // c comes back: it takes exactly one from each.
        let third = run(
            &[
                ("a", t.clone(), second["a"].clone()),
                ("b", t.clone(), second["b"].clone()),
                ("c", t.clone(), none),
            ],
            &[("orders", 6)],
        );
        check_complete_and_balanced(&third, 6);
        let moved: usize = ["a", "b"]
            .iter()
            .map(|m| second[*m].difference(&third[*m]).count())
            .sum();
        assert_eq!(moved, 2);
    }

    #[test]
    fn only_subscribers_get_a_topic_and_missing_topics_are_skipped() {
        let result = run(
            &[
                ("a", topics(&["x", "y"]), BTreeSet::new()),
                ("b", topics(&["y", "ghost"]), BTreeSet::new()),
            ],
            &[("x", 3), ("y", 2)],
        );
        assert_eq!(result["a"].iter().filter(|tp| tp.topic == "x").count(), 3);
        assert_eq!(result["b"].iter().filter(|tp| tp.topic == "x").count(), 0);
        assert_eq!(result["a"].iter().filter(|tp| tp.topic == "y").count(), 1);
        assert_eq!(result["b"].iter().filter(|tp| tp.topic == "y").count(), 1);
    }

    #[test]
    fn is_deterministic_and_drops_partitions_that_no_longer_exist() {
        let t = topics(&["t"]);
        let stale: BTreeSet<_> = [TopicPartition::new("t", 7)].into();
        let one = run(
            &[
                ("a", t.clone(), stale.clone()),
                ("b", t.clone(), BTreeSet::new()),
            ],
            &[("t", 4)],
        );
        let two = run(
            &[("a", t.clone(), stale), ("b", t, BTreeSet::new())],
            &[("t", 4)],
        );
        assert_eq!(one, two);
        assert!(one.values().flatten().all(|tp| tp.partition < 4));
        check_complete_and_balanced(&one, 4);
    }
}
