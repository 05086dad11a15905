//! TEMPORARY placeholder while the classic group layer is written.
#![allow(unused)]
use super::Context;
use kafka_protocol::messages::*;
use std::sync::Arc;
pub(super) async fn join_group(
    _: &Arc<Context>,
    _: JoinGroupRequest,
    _: &RequestHeader,
) -> JoinGroupResponse {
    JoinGroupResponse::default()
}
pub(super) async fn sync_group(_: &Arc<Context>, _: SyncGroupRequest) -> SyncGroupResponse {
    SyncGroupResponse::default()
}
pub(super) fn heartbeat(_: &Arc<Context>, _: HeartbeatRequest) -> HeartbeatResponse {
    HeartbeatResponse::default()
}
pub(super) fn leave_group(_: &Arc<Context>, _: LeaveGroupRequest, _: i16) -> LeaveGroupResponse {
    LeaveGroupResponse::default()
}
pub(super) async fn offset_commit(
    _: &Arc<Context>,
    _: OffsetCommitRequest,
) -> OffsetCommitResponse {
    OffsetCommitResponse::default()
}
pub(super) fn offset_fetch(_: &Arc<Context>, _: OffsetFetchRequest, _: i16) -> OffsetFetchResponse {
    OffsetFetchResponse::default()
}
pub(super) fn list_groups(_: &Arc<Context>, _: ListGroupsRequest) -> ListGroupsResponse {
    ListGroupsResponse::default()
}
pub(super) fn describe_groups(
    _: &Arc<Context>,
    _: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    DescribeGroupsResponse::default()
}
