//! Checks and settings that more than one service needs: group and member
//! ids, and a group's retry settings and DLQ name of a topic. Below
//! `groups` and `dlq`, so that neither service imports the other.

use tonic::Status;

use super::status;
use crate::dlq::RetrySets;
use crate::topics::{DeadLetterConfig, TopicRegistry, name_rule_violation};

pub(crate) fn check_group_id(group_id: &str) -> Result<(), Status> {
    match name_rule_violation(group_id) {
        Some(reason) => Err(Status::invalid_argument(format!(
            "invalid group id {group_id:?}: {reason}"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn check_member_id(member_id: &str) -> Result<(), Status> {
    if member_id.is_empty() {
        return Err(Status::invalid_argument(
            "member id is empty: join the group first",
        ));
    }
    Ok(())
}

/// `topic`'s retry and dead-letter settings as `group` has them: the
/// topic's, changed by what the group set.
pub(crate) fn effective_settings(
    topics: &TopicRegistry,
    retries: &RetrySets,
    topic: &str,
    group: &str,
) -> Result<DeadLetterConfig, Status> {
    let base = topics
        .get(topic)
        .map_err(status::topic)?
        .config()
        .dead_letters;
    let Some(patch) = retries.group_override(group, topic) else {
        return Ok(base);
    };
    // Checked when set; a later change of the topic may clash with it.
    Ok(base.patched(&patch).unwrap_or_else(|e| {
        tracing::warn!(group, topic, error = %e, "the group's retry settings no longer fit the topic's; using the topic's");
        base
    }))
}

/// The DLQ topic `group` dead-letters `topic`'s records to, checked to be
/// a valid topic name: the template is checked alone when set, but only
/// the real topic and group show whether the name they make is too long.
pub(crate) fn dlq_topic_for(
    topics: &TopicRegistry,
    retries: &RetrySets,
    topic: &str,
    group: &str,
) -> Result<String, Status> {
    let settings = effective_settings(topics, retries, topic, group)?;
    check_dlq_name(&settings, topic, group)
}

/// `settings`' DLQ topic for `topic` and `group`, if it is a valid name.
pub(crate) fn check_dlq_name(
    settings: &DeadLetterConfig,
    topic: &str,
    group: &str,
) -> Result<String, Status> {
    let name = settings.dlq_topic(topic, group);
    match name_rule_violation(&name) {
        None => Ok(name),
        Some(reason) => Err(Status::invalid_argument(format!(
            "the dead-letter topic of topic {topic:?} for group {group:?} would be {name:?} \
             (template {:?}), which is not a valid topic name: {reason}; use a shorter \
             group id or topic name, or a shorter dlq_topic template for the topic or \
             the group (SetGroupSettings)",
            settings.dlq_topic
        ))),
    }
}
