//! Broker errors as Kafka error codes, and the answers that carry only an
//! error.
//!
//! Every error keeps its message: Kafka answers that have an error message
//! field carry it, and the rest are logged, so a client's "CORRUPT_MESSAGE"
//! can be traced to the record and rule in the broker's log.

use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DescribeClusterResponse, FetchResponse, FindCoordinatorResponse,
    HeartbeatResponse, InitProducerIdResponse, JoinGroupResponse, LeaveGroupResponse,
    ListGroupsResponse, OffsetFetchResponse, ResponseKind, SyncGroupResponse,
};

pub use kafka_protocol::error::ResponseError as KafkaCode;

use crate::groups::GroupError;
use crate::producers::{ProducerAppendError, SequenceError};
use crate::state::DeleteTopicError;
use crate::storage::StorageError;
use crate::topics::TopicError;

/// A failed operation as a client sees it: the code and what went wrong.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: KafkaCode,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(code: KafkaCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<StorageError> for Failure {
    fn from(error: StorageError) -> Self {
        let code = match &error {
            // Records lost to damage: the consumer's reset policy moves it
            // past them, as for records retention removed, rather than
            // retrying a read that can never succeed.
            StorageError::OffsetOutOfRange { .. } | StorageError::DataLoss { .. } => {
                KafkaCode::OffsetOutOfRange
            }
            StorageError::BatchTooLarge { .. } => KafkaCode::RecordListTooLarge,
            StorageError::InvalidConfig(_) => KafkaCode::InvalidConfig,
            // A deleted topic's logs close under requests in flight.
            StorageError::Closed(_) => KafkaCode::UnknownTopicOrPartition,
            // Retriable: a full disk, the reserve or the descriptor limit
            // pass; a failed partition is named in the broker's log.
            _ => KafkaCode::KafkaStorageError,
        };
        if code == KafkaCode::KafkaStorageError {
            tracing::warn!(%error, "storage error answered to a Kafka client");
        }
        Failure::new(code, error.to_string())
    }
}

impl From<TopicError> for Failure {
    fn from(error: TopicError) -> Self {
        let code = match &error {
            TopicError::NotFound(_) | TopicError::NoSuchPartition { .. } => {
                KafkaCode::UnknownTopicOrPartition
            }
            TopicError::AlreadyExists(_) => KafkaCode::TopicAlreadyExists,
            TopicError::InvalidName { .. } => KafkaCode::InvalidTopicException,
            TopicError::InvalidConfig(_) => KafkaCode::InvalidConfig,
            TopicError::Storage(_) => {
                let TopicError::Storage(e) = error else {
                    unreachable!()
                };
                return Failure::from(e);
            }
            TopicError::Metadata { .. } | TopicError::ProducerState(_) => {
                tracing::error!(%error, "topic error answered to a Kafka client");
                KafkaCode::UnknownServerError
            }
        };
        Failure::new(code, error.to_string())
    }
}

impl From<SequenceError> for Failure {
    fn from(error: SequenceError) -> Self {
        let code = match &error {
            SequenceError::Fenced { .. } => KafkaCode::InvalidProducerEpoch,
            SequenceError::OutOfOrder { .. } | SequenceError::InvalidSequence { .. } => {
                KafkaCode::OutOfOrderSequenceNumber
            }
            SequenceError::UnknownProducer { .. } => KafkaCode::UnknownProducerId,
        };
        Failure::new(code, error.to_string())
    }
}

impl From<ProducerAppendError> for Failure {
    fn from(error: ProducerAppendError) -> Self {
        match error {
            ProducerAppendError::Sequence(e) => Failure::from(e),
            ProducerAppendError::Storage(e) => Failure::from(e),
        }
    }
}

impl From<DeleteTopicError> for Failure {
    fn from(error: DeleteTopicError) -> Self {
        match error {
            DeleteTopicError::Topic(e) => Failure::from(e),
            // The topic is gone; what is left is bound to the deleted
            // incarnation and dropped at the next start.
            DeleteTopicError::GroupState(e) => Failure::from(e),
        }
    }
}

impl From<GroupError> for Failure {
    fn from(error: GroupError) -> Self {
        let code = match &error {
            GroupError::UnknownGroup(_) => KafkaCode::GroupIdNotFound,
            GroupError::UnknownMember { .. } => KafkaCode::UnknownMemberId,
            GroupError::InvalidMemberEpoch { .. } => KafkaCode::IllegalGeneration,
            GroupError::NotOwner { .. } => KafkaCode::UnknownMemberId,
            GroupError::GroupNotEmpty { .. } => KafkaCode::NonEmptyGroup,
            GroupError::InvalidSessionTimeout { .. } => KafkaCode::InvalidSessionTimeout,
            GroupError::NoTopics => KafkaCode::InvalidRequest,
            GroupError::Storage(_) => KafkaCode::KafkaStorageError,
            #[allow(unreachable_patterns)]
            _ => KafkaCode::UnknownServerError,
        };
        Failure::new(code, error.to_string())
    }
}

/// An answer to `api` at `version` that carries only `code`, for APIs with
/// a top-level error code in that version; `None` for the others (their
/// errors are per topic or partition, which a request that could not be
/// read does not give).
pub(crate) fn error_response(api: ApiKey, version: i16, code: KafkaCode) -> Option<ResponseKind> {
    let code = code.code();
    Some(match api {
        ApiKey::ApiVersions => {
            let mut r = ApiVersionsResponse::default();
            r.error_code = code;
            ResponseKind::ApiVersions(r)
        }
        ApiKey::Fetch if version >= 7 => {
            let mut r = FetchResponse::default();
            r.error_code = code;
            ResponseKind::Fetch(r)
        }
        ApiKey::FindCoordinator if version <= 3 => {
            let mut r = FindCoordinatorResponse::default();
            r.error_code = code;
            ResponseKind::FindCoordinator(r)
        }
        ApiKey::JoinGroup => {
            let mut r = JoinGroupResponse::default();
            r.error_code = code;
            ResponseKind::JoinGroup(r)
        }
        ApiKey::SyncGroup => {
            let mut r = SyncGroupResponse::default();
            r.error_code = code;
            ResponseKind::SyncGroup(r)
        }
        ApiKey::Heartbeat => {
            let mut r = HeartbeatResponse::default();
            r.error_code = code;
            ResponseKind::Heartbeat(r)
        }
        ApiKey::LeaveGroup => {
            let mut r = LeaveGroupResponse::default();
            r.error_code = code;
            ResponseKind::LeaveGroup(r)
        }
        ApiKey::ListGroups => {
            let mut r = ListGroupsResponse::default();
            r.error_code = code;
            ResponseKind::ListGroups(r)
        }
        ApiKey::OffsetFetch if (2..=7).contains(&version) => {
            let mut r = OffsetFetchResponse::default();
            r.error_code = code;
            ResponseKind::OffsetFetch(r)
        }
        ApiKey::InitProducerId => {
            let mut r = InitProducerIdResponse::default();
            r.error_code = code;
            ResponseKind::InitProducerId(r)
        }
        ApiKey::DescribeCluster => {
            let mut r = DescribeClusterResponse::default();
            r.error_code = code;
            ResponseKind::DescribeCluster(r)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::kafka::SUPPORTED_APIS;

    /// Every error-only answer encodes in every version served (a field a
    /// version cannot carry would fail here, not on a client's request),
    /// and the APIs that must always have one do.
    #[test]
    fn error_answers_encode_in_every_version_served() {
        for (api, min, max) in SUPPORTED_APIS {
            for version in *min..=*max {
                let Some(response) = error_response(*api, version, KafkaCode::InvalidRequest)
                else {
                    continue;
                };
                let mut buf = BytesMut::new();
                response
                    .encode(&mut buf, version)
                    .unwrap_or_else(|e| panic!("{api:?} v{version}: {e}"));
            }
        }
        for api in [ApiKey::ApiVersions, ApiKey::JoinGroup, ApiKey::Heartbeat] {
            assert!(error_response(api, 0, KafkaCode::UnsupportedVersion).is_some());
        }
    }
}
