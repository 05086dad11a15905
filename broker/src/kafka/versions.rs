//! The Kafka APIs this listener serves, with their versions, and the
//! ApiVersions answer built from them (docs/KAFKA.md has the same table
//! for people).
//!
//! Each range starts at the oldest version the `kafka-protocol` crate
//! still codes (Kafka 4's floor: record batch v2 only) and ends at the
//! newest whose semantics are served in full. Versions past that add what
//! Sluice does not have (topic ids in Fetch, KIP-848's consumer protocol
//! in the group APIs, transactions in Produce), so they are left out and
//! clients negotiate down.

use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, api_versions_response::ApiVersion};

/// `(api, oldest, newest)` of every API served.
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 9),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::DescribeCluster, 0, 1),
];

/// The API's name as metrics label it: one of the served APIs, or
/// "other".
pub fn api_name(api: ApiKey) -> &'static str {
    match api {
        ApiKey::Produce => "Produce",
        ApiKey::Fetch => "Fetch",
        ApiKey::ListOffsets => "ListOffsets",
        ApiKey::Metadata => "Metadata",
        ApiKey::OffsetCommit => "OffsetCommit",
        ApiKey::OffsetFetch => "OffsetFetch",
        ApiKey::FindCoordinator => "FindCoordinator",
        ApiKey::JoinGroup => "JoinGroup",
        ApiKey::Heartbeat => "Heartbeat",
        ApiKey::LeaveGroup => "LeaveGroup",
        ApiKey::SyncGroup => "SyncGroup",
        ApiKey::DescribeGroups => "DescribeGroups",
        ApiKey::ListGroups => "ListGroups",
        ApiKey::ApiVersions => "ApiVersions",
        ApiKey::CreateTopics => "CreateTopics",
        ApiKey::DeleteTopics => "DeleteTopics",
        ApiKey::InitProducerId => "InitProducerId",
        ApiKey::DescribeConfigs => "DescribeConfigs",
        ApiKey::DescribeCluster => "DescribeCluster",
        _ => "other",
    }
}

/// The versions of `api` served, if it is served at all.
pub fn supported(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(key, _, _)| *key == api)
        .map(|(_, min, max)| (*min, *max))
}

/// Whether `version` of `api` is served.
pub fn is_supported(api: ApiKey, version: i16) -> bool {
    supported(api).is_some_and(|(min, max)| (min..=max).contains(&version))
}

/// The ApiVersions answer: every API and its range, with `error_code`
/// (UNSUPPORTED_VERSION when the request's own version is not served; the
/// client then retries with a version from the list, KIP-511).
pub fn api_versions_response(error_code: i16) -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.error_code = error_code;
    response.api_keys = SUPPORTED_APIS
        .iter()
        .map(|(key, min, max)| {
            let mut version = ApiVersion::default();
            version.api_key = *key as i16;
            version.min_version = *min;
            version.max_version = *max;
            version
        })
        .collect();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range is one the codec crate can encode and decode, and no
    /// API is listed twice.
    #[test]
    fn every_range_is_within_the_codecs() {
        let mut seen = std::collections::BTreeSet::new();
        for (api, min, max) in SUPPORTED_APIS {
            let codec = api.valid_versions();
            assert!(
                codec.min <= *min && *max <= codec.max && min <= max,
                "{api:?} {min}..={max} is outside the codec's {codec}"
            );
            assert!(seen.insert(*api as i16), "{api:?} listed twice");
            assert_eq!(api_name(*api), format!("{api:?}"), "its metrics label");
        }
    }
}
