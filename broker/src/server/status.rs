//! Mapping of broker errors to gRPC statuses a client can act on.

use tonic::{Code, Status};

use crate::groups::GroupError;
use crate::producers::{ProducerAppendError, ProducerStateError, SequenceError};
use crate::storage::StorageError;
use crate::topics::TopicError;

pub(crate) fn storage(error: StorageError) -> Status {
    let code = match &error {
        StorageError::OffsetOutOfRange { .. } => Code::OutOfRange,
        StorageError::BatchTooLarge { .. } => Code::InvalidArgument,
        StorageError::InvalidConfig(_) => Code::InvalidArgument,
        // A deleted topic's logs are closed under requests still in flight.
        StorageError::Closed(_) => Code::Unavailable,
        StorageError::Failed { .. } => Code::Unavailable,
        // A full disk, the free-space reserve and the descriptor limit are
        // conditions that pass: the client may retry later.
        StorageError::DiskFull { .. }
        | StorageError::BelowFreeSpaceReserve { .. }
        | StorageError::OutOfDescriptors { .. } => Code::ResourceExhausted,
        StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            Code::ResourceExhausted
        }
        StorageError::Io { .. }
        | StorageError::Locked { .. }
        | StorageError::Corrupt { .. }
        | StorageError::SegmentGap { .. }
        | StorageError::Batch(_) => Code::Internal,
        StorageError::DataLoss { .. } => Code::DataLoss,
    };
    if code == Code::Internal {
        tracing::error!(%error, "storage error");
    }
    let status = Status::new(code, error.to_string());
    match error {
        // The loss was named in the log when the partition was opened;
        // the client learns where reading can go on without parsing.
        StorageError::DataLoss { end, .. } => {
            let mut status = with_reason(status, "data-loss");
            status
                .metadata_mut()
                .insert(NEXT_OFFSET, tonic::metadata::MetadataValue::from(end));
            status
        }
        _ => status,
    }
}

pub(crate) fn topic(error: TopicError) -> Status {
    match error {
        TopicError::NotFound(_) | TopicError::NoSuchPartition { .. } => {
            Status::not_found(error.to_string())
        }
        TopicError::AlreadyExists(_) => Status::already_exists(error.to_string()),
        TopicError::InvalidName { .. } | TopicError::InvalidConfig(_) => {
            Status::invalid_argument(error.to_string())
        }
        TopicError::Storage(e) => storage(e),
        TopicError::Metadata { .. } | TopicError::ProducerState(_) => {
            tracing::error!(%error, "topic metadata error");
            Status::internal(error.to_string())
        }
    }
}

pub(crate) fn producer_append(error: ProducerAppendError) -> Status {
    match error {
        ProducerAppendError::Sequence(e) => sequence(e),
        ProducerAppendError::Storage(e) => storage(e),
    }
}

/// Metadata key naming what a FAILED_PRECONDITION from an idempotent
/// produce means, so clients need not parse messages.
pub(crate) const ERROR_REASON: &str = "sluice-error";

/// Metadata key of a DATA_LOSS status: the next offset the partition can
/// read, past the lost range.
pub(crate) const NEXT_OFFSET: &str = "sluice-next-offset";

pub(crate) fn sequence(error: SequenceError) -> Status {
    let reason = match error {
        SequenceError::InvalidSequence { .. } => {
            return Status::invalid_argument(error.to_string());
        }
        SequenceError::Fenced { .. } => "fenced",
        SequenceError::OutOfOrder { .. } => "out-of-order",
        SequenceError::UnknownProducer { .. } => "unknown-producer",
    };
    with_reason(Status::failed_precondition(error.to_string()), reason)
}

pub(crate) fn group(error: GroupError) -> Status {
    let reason = match error {
        GroupError::Storage(e) => return storage(e),
        GroupError::UnknownGroup(_) => return Status::not_found(error.to_string()),
        GroupError::InvalidSessionTimeout { .. } | GroupError::NoTopics => {
            return Status::invalid_argument(error.to_string());
        }
        GroupError::UnknownMember { .. } => "unknown-member",
        GroupError::InvalidMemberEpoch { .. } => "invalid-member-epoch",
        GroupError::NotOwner { .. } => "not-owner",
        GroupError::GroupNotEmpty { .. } => "group-not-empty",
    };
    with_reason(Status::failed_precondition(error.to_string()), reason)
}

fn with_reason(mut status: Status, reason: &'static str) -> Status {
    status.metadata_mut().insert(
        ERROR_REASON,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

/// The reason a status carries in [`ERROR_REASON`], if any.
pub(crate) fn reason(status: &Status) -> String {
    status
        .metadata()
        .get(ERROR_REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

pub(crate) fn producer_state(error: ProducerStateError) -> Status {
    match error {
        ProducerStateError::NameTooLong(_) => Status::invalid_argument(error.to_string()),
        ProducerStateError::Storage(e) => storage(e),
        ProducerStateError::Corrupt { .. } => Status::internal(error.to_string()),
    }
}

/// A blocking task that panicked or was cancelled.
pub(crate) fn join(error: tokio::task::JoinError) -> Status {
    tracing::error!(%error, "blocking task failed");
    Status::internal(format!("internal error: {error}"))
}

/// What tonic says when a message is over the size limit. The gRPC spec
/// answers that with RESOURCE_EXHAUSTED; tonic uses OUT_OF_RANGE, which a
/// Sluice client would read as "offset out of range".
const TOO_LARGE: &str = "message length too large";

/// Corrects the code of an over-limit status that reached our code (a
/// streamed request message).
pub(crate) fn inbound(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains(TOO_LARGE) {
        return Status::resource_exhausted(status.message().to_owned());
    }
    status
}

/// Corrects the code of an over-limit status that tonic answered before
/// our code ran (a unary request): it is in the response headers.
pub(crate) fn remap_message_limit<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let over_limit = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains(TOO_LARGE));
    if over_limit {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
        );
    }
    response
}

pub(crate) fn auth(error: crate::auth::AuthError) -> Status {
    use crate::auth::AuthError;
    match error {
        AuthError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
        AuthError::Denied { .. } => Status::permission_denied(error.to_string()),
        AuthError::Invalid(_) => Status::invalid_argument(error.to_string()),
        AuthError::NotFound(_) => Status::not_found(error.to_string()),
        AuthError::AlreadyExists(_) => Status::already_exists(error.to_string()),
        AuthError::Storage(e) => storage(e),
        AuthError::Io { .. } => {
            tracing::error!(%error, "auth store error");
            Status::internal(error.to_string())
        }
    }
}
