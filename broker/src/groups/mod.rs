//! Consumer groups, coordinated by the broker.
//!
//! This module owns group membership, the assignment of partitions to
//! members, the handover of a partition from one member to the next, and
//! committed offsets:
//!
//! - [`assignor`]: balanced, sticky assignment computed by the broker.
//! - [`GroupCoordinator`]: join, heartbeat, leave, session timeouts, static
//!   membership, commit fencing, offset reset and expiry.
//! - [`ClassicGroups`]: Kafka's classic group protocol (JoinGroup,
//!   SyncGroup, Heartbeat, LeaveGroup; the group leader assigns), owned by
//!   the coordinator, committing to the same offsets.
//! - [`OffsetStore`]: committed offsets, durable across crashes.
//!
//! It knows nothing of gRPC or of Kafka's wire format; it learns partition
//! counts through [`TopicCatalog`] and never reads topic data (lag is
//! computed by the caller from the offsets here and the logs' end offsets).

pub mod assignor;
mod classic;
mod coordinator;
mod offsets;

pub use assignor::TopicPartition;
pub use classic::{
    ClassicDescription, ClassicError, ClassicGroups, ClassicListing, ClassicMemberDescription,
    ClassicState, JoinOutcome, JoinRequest, JoinedMember, Pending, SyncOutcome,
};
pub use coordinator::{
    Assignment, GroupCoordinator, GroupDescription, GroupError, GroupProtocol, GroupSettings,
    Joined, MemberDescription, OffsetChange, TopicCatalog,
};
pub use offsets::{CommittedOffset, OffsetStore};
