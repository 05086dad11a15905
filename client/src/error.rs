//! The client's errors, and which of them are worth retrying.

use std::time::Duration;

use tonic::Code;

/// What went wrong, in terms a caller can act on: [`Error::is_retryable`]
/// says whether trying again later may succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused the request as it stands (bad input, unknown
    /// topic, offset out of range ...). Retrying the same request fails the
    /// same way.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rejected(tonic::Status),
    /// A read fell inside offsets the broker lost to a damaged or missing
    /// file (gRPC DATA_LOSS). `message` names the file, the byte position
    /// and the range lost; reading can go on at `next_offset`. Consumers
    /// stop here unless told to skip (`skip_data_loss`).
    #[error("data loss: {message}")]
    DataLoss {
        /// The broker's description of the loss.
        message: String,
        /// The first offset after the lost range that can be read.
        next_offset: u64,
    },
    /// The broker could not be reached or is shutting down; retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A record was not delivered within the producer's delivery timeout,
    /// and was never sent: it was not written. Safe to send again.
    #[error("not delivered within {0:?}: {1}")]
    Timeout(Duration, String),
    /// A record was sent but not acknowledged within the producer's
    /// delivery timeout (the broker stalled, or its answer was lost): it
    /// may or may not have been written. Not retryable as such: sending it
    /// again may write it twice (librdkafka's `_MSG_TIMED_OUT` with status
    /// "possibly persisted").
    #[error(
        "outcome unknown: sent but not acknowledged within {0:?}, it may have been written: {1}"
    )]
    UnknownOutcome(Duration, String),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// The broker's URL is not valid.
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A client setting cannot be used (an unreadable certificate file, a
    /// token that is not valid metadata).
    #[error("invalid client setting: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Timeout(..))
    }

    /// What a broker refusal means, when the broker says (the
    /// `sluice-error` metadata): `unknown-member`, `not-owner`,
    /// `group-not-empty`, `fenced`, `out-of-order`, `unknown-producer` ...
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Rejected(status) => status
                .metadata()
                .get("sluice-error")
                .and_then(|v| v.to_str().ok()),
            _ => None,
        }
    }

    /// The gRPC code of a broker refusal.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rejected(status) => Some(status.code()),
            Error::DataLoss { .. } => Some(Code::DataLoss),
            _ => None,
        }
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::InvalidArgument => "invalid argument",
        Code::OutOfRange => "out of range",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::DataLoss => "data loss",
        _ => "refused",
    }
}

/// Transport failures and statuses that mean "not now" become
/// [`Error::Unavailable`]; the rest are refusals.
impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted => Error::Unavailable(status.message().to_owned()),
            Code::DataLoss => match next_offset(&status) {
                Some(next_offset) => Error::DataLoss {
                    message: status.message().to_owned(),
                    next_offset,
                },
                None => Error::Rejected(status),
            },
            _ => Error::Rejected(status),
        }
    }
}

/// Metadata key of a DATA_LOSS status: where reading can go on.
pub(crate) const NEXT_OFFSET: &str = "sluice-next-offset";

fn next_offset(status: &tonic::Status) -> Option<u64> {
    status
        .metadata()
        .get(NEXT_OFFSET)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
