//! One Kafka connection: frames in, one request at a time, answers out in
//! order.
//!
//! A frame is a 4-byte big-endian size and that many bytes: a request
//! header (API key, version, correlation id, client id) and the body. What
//! closes the connection, and nothing else: a size below a header's or
//! above [`KafkaSettings::max_frame_bytes`](super::KafkaSettings), a frame
//! cut short by the peer, a header that cannot be read, an API key Kafka
//! does not know, or an error the API cannot carry in its answer.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Encodable, decode_request_header_from_buffer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::errors::{KafkaCode, error_response};
use super::{Context, admin, fetch, groups, produce, versions};

/// The smallest frame that holds a request header: API key, version,
/// correlation id and the client id's length.
pub const MIN_FRAME_BYTES: usize = 10;

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The peer closed it between requests.
    Closed,
    /// The peer went away mid-exchange (reset, broken pipe): routine when
    /// a client closes during a long poll.
    Lost(std::io::Error),
    /// Something the listener closes it for, with the reason for the log.
    Refused(String),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::UnexpectedEof => End::Refused("the frame was cut short".into()),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
                End::Lost(e)
            }
            _ => End::Refused(format!("the connection failed: {e}")),
        }
    }
}

pub(super) async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    context: Arc<Context>,
) {
    let span = tracing::info_span!("kafka_connection", %peer);
    let metrics = context.metrics.as_ref().map(|m| m.kafka.clone());
    async move {
        tracing::debug!("Kafka connection opened");
        if let Some(m) = &metrics {
            m.connections.inc();
        }
        let end = serve_requests(&mut stream, &context, peer).await;
        if let Some(m) = &metrics {
            m.connections.dec();
        }
        match end {
            End::Closed => tracing::debug!("Kafka connection closed by the client"),
            End::Lost(error) => tracing::debug!(%error, "Kafka connection lost"),
            End::Refused(reason) => {
                if let Some(m) = &metrics {
                    m.refused_connections.inc();
                }
                tracing::warn!(%reason, "closing a Kafka connection");
            }
        }
        let _ = stream.shutdown().await;
    }
    .instrument(span)
    .await
}

async fn serve_requests(stream: &mut TcpStream, context: &Arc<Context>, peer: SocketAddr) -> End {
    let mut stopping = context.shutdown.clone();
    loop {
        let frame = tokio::select! {
            frame = read_frame(stream, context.settings.max_frame_bytes) => frame,
            _ = stopping.wait_for(|stop| *stop) => return End::Closed,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return End::Closed,
            Err(end) => return end,
        };
        let started = std::time::Instant::now();
        let api = ApiKey::try_from(i16::from_be_bytes([frame[0], frame[1]]))
            .map_or("other", versions::api_name);
        let answer = match answer(frame, context, peer).await {
            Ok(answer) => answer,
            Err(end) => return end,
        };
        if let Some(bytes) = answer
            && let Err(e) = stream.write_all(&bytes).await
        {
            return End::from(e);
        }
        if let Some(m) = &context.metrics {
            m.kafka.observe(api, started.elapsed());
        }
    }
}

/// The next frame's bytes, or `None` when the peer closed the connection
/// between frames.
async fn read_frame(stream: &mut TcpStream, max: usize) -> Result<Option<Bytes>, End> {
    let mut size = [0u8; 4];
    match stream.read(&mut size[..1]).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(End::from(e)),
    }
    stream.read_exact(&mut size[1..]).await?;
    let size = i32::from_be_bytes(size);
    let size = usize::try_from(size)
        .map_err(|_| End::Refused(format!("the frame size {size} is negative")))?;
    if size > max {
        return Err(End::Refused(format!(
            "the frame of {size} bytes is over the limit of {max} bytes"
        )));
    }
    if size < MIN_FRAME_BYTES {
        return Err(End::Refused(format!(
            "the frame of {size} bytes is too short for a request header"
        )));
    }
    let mut frame = vec![0u8; size];
    stream.read_exact(&mut frame).await?;
    Ok(Some(Bytes::from(frame)))
}

/// The encoded answer to one frame (`None`: the request wants none, a
/// Produce with acks 0), or the reason to close the connection.
/// What a request frame (without its size) holds, as far as the listener
/// can read it. Pure, so that the fuzz target `kafka_frame` drives the
/// same parse the connection does.
#[derive(Debug)]
pub enum ParsedFrame {
    /// A frame that closes the connection, with the reason.
    Refused(String),
    /// ApiVersions in a version not served: answered in version 0.
    ApiVersionsUnsupported { correlation_id: i32 },
    /// A served API in a version not served.
    Unsupported(ApiKey, RequestHeader),
    /// A header that reads, a body that does not.
    Malformed(ApiKey, RequestHeader, String),
    /// A request to handle (boxed: a request is far larger than the
    /// other cases).
    Request(ApiKey, RequestHeader, Box<RequestKind>),
}

/// Reads a frame of at least [`MIN_FRAME_BYTES`] (the caller checks):
/// the API and version first, so that nothing is decoded in a version the
/// codec does not know, then the header, then the body.
pub fn parse_frame(mut frame: Bytes) -> ParsedFrame {
    if frame.len() < MIN_FRAME_BYTES {
        return ParsedFrame::Refused(format!(
            "the frame of {} bytes is too short for a request header",
            frame.len()
        ));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let Ok(api) = ApiKey::try_from(key) else {
        return ParsedFrame::Refused(format!("API key {key} is not a Kafka API"));
    };
    if api == ApiKey::ApiVersions && !versions::is_supported(api, version) {
        let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
        return ParsedFrame::ApiVersionsUnsupported { correlation_id };
    }
    let known = api.valid_versions();
    if known.min > version || version > known.max {
        return ParsedFrame::Refused(format!(
            "{api:?} version {version} is not one Kafka defines"
        ));
    }
    let header = match decode_request_header_from_buffer(&mut frame) {
        Ok(header) => header,
        Err(e) => {
            return ParsedFrame::Refused(format!("the {api:?} request header is unreadable: {e}"));
        }
    };
    if !versions::is_supported(api, version) {
        return ParsedFrame::Unsupported(api, header);
    }
    match RequestKind::decode(api, &mut frame, version) {
        Ok(request) => ParsedFrame::Request(api, header, Box::new(request)),
        Err(e) => ParsedFrame::Malformed(api, header, e.to_string()),
    }
}

async fn answer(
    frame: Bytes,
    context: &Arc<Context>,
    peer: SocketAddr,
) -> Result<Option<Bytes>, End> {
    let (api, header, request) = match parse_frame(frame) {
        ParsedFrame::Refused(reason) => return Err(End::Refused(reason)),
        ParsedFrame::ApiVersionsUnsupported { correlation_id } => {
            // KIP-511: answer in version 0, which every client reads, with
            // the versions served, so the client can retry with one of them.
            tracing::debug!("ApiVersions in an unsupported version");
            let response = versions::api_versions_response(KafkaCode::UnsupportedVersion.code());
            return encode(
                ApiKey::ApiVersions,
                0,
                correlation_id,
                &ResponseKind::ApiVersions(response),
            )
            .map(Some);
        }
        ParsedFrame::Unsupported(api, header) => {
            tracing::debug!(
                ?api,
                version = header.request_api_version,
                "unsupported version"
            );
            return refuse(api, &header, KafkaCode::UnsupportedVersion);
        }
        ParsedFrame::Malformed(api, header, error) => {
            tracing::warn!(?api, version = header.request_api_version, %error, "a malformed Kafka request");
            return refuse(api, &header, KafkaCode::InvalidRequest);
        }
        ParsedFrame::Request(api, header, request) => (api, header, *request),
    };
    let version = header.request_api_version;
    let span = tracing::debug_span!(
        "kafka_request",
        api = ?api,
        version,
        correlation_id = header.correlation_id,
        client_id = header.client_id.as_deref().unwrap_or(""),
    );
    async move {
        let Some(response) = dispatch(context, &header, request, peer).await? else {
            return Ok(None);
        };
        encode(api, version, header.correlation_id, &response).map(Some)
    }
    .instrument(span)
    .await
}

/// Answers `header`'s request with `code` where its API has an error code
/// to carry it; otherwise closes the connection.
fn refuse(api: ApiKey, header: &RequestHeader, code: KafkaCode) -> Result<Option<Bytes>, End> {
    match error_response(api, header.request_api_version, code) {
        Some(response) => encode(
            api,
            header.request_api_version,
            header.correlation_id,
            &response,
        )
        .map(Some),
        None => Err(End::Refused(format!(
            "{api:?} version {} cannot carry {code:?} in its answer",
            header.request_api_version
        ))),
    }
}

async fn dispatch(
    context: &Arc<Context>,
    header: &RequestHeader,
    request: RequestKind,
    peer: SocketAddr,
) -> Result<Option<ResponseKind>, End> {
    let version = header.request_api_version;
    let response = match request {
        RequestKind::ApiVersions(_) => {
            ResponseKind::ApiVersions(versions::api_versions_response(0))
        }
        RequestKind::Metadata(r) => ResponseKind::Metadata(admin::metadata(context, r, version)),
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(admin::create_topics(context, r, version).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(admin::delete_topics(context, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(admin::describe_configs(context, r))
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(admin::describe_cluster(context, r))
        }
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(admin::find_coordinator(context, r, version))
        }
        RequestKind::Produce(r) => {
            let acks = r.acks;
            let response = produce::produce(context, r).await;
            if acks == 0 {
                // No answer is read, so a refusal is told the way Kafka's
                // brokers tell it: the connection closes, and the client
                // learns of it (and refreshes its metadata).
                let refused = response
                    .responses
                    .iter()
                    .flat_map(|t| &t.partition_responses)
                    .find(|p| p.error_code != 0);
                return match refused {
                    Some(p) => Err(End::Refused(format!(
                        "a produce with acks 0 was refused ({:?}: {})",
                        KafkaCode::try_from_code(p.error_code),
                        p.error_message.as_deref().unwrap_or("")
                    ))),
                    None => Ok(None),
                };
            }
            ResponseKind::Produce(response)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(produce::init_producer_id(context, r).await)
        }
        RequestKind::Fetch(r) => ResponseKind::Fetch(fetch::fetch(context, r, version).await),
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(fetch::list_offsets(context, r, version).await)
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(groups::join_group(context, r, header, peer).await)
        }
        RequestKind::SyncGroup(r) => {
            ResponseKind::SyncGroup(groups::sync_group(context, r, version).await)
        }
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(groups::heartbeat(context, r)),
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(groups::leave_group(context, r, version))
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(groups::offset_commit(context, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(groups::offset_fetch(context, r, version))
        }
        RequestKind::ListGroups(r) => ResponseKind::ListGroups(groups::list_groups(context, r)),
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(groups::describe_groups(context, r, version))
        }
        other => {
            // Unreachable while SUPPORTED_APIS and this match agree; a
            // unit test keeps them in step.
            tracing::error!(request = ?std::mem::discriminant(&other), "a supported API has no handler");
            let api = ApiKey::try_from(header.request_api_key)
                .map_err(|_| End::Refused("a request of no known API".into()))?;
            return Ok(error_response(api, version, KafkaCode::UnsupportedVersion));
        }
    };
    Ok(Some(response))
}

/// A response frame: size, header, body.
fn encode(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<Bytes, End> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    let encoded = header
        .encode(&mut buf, api.response_header_version(version))
        .and_then(|()| response.encode(&mut buf, version));
    if let Err(e) = encoded {
        // A bug of ours (a field this version cannot carry), not the
        // client's: name it and close rather than send garbage.
        tracing::error!(?api, version, error = %e, "encoding a Kafka response failed");
        return Err(End::Refused(format!(
            "the {api:?} v{version} answer could not be encoded: {e}"
        )));
    }
    let size = i32::try_from(buf.len() - 4).map_err(|_| {
        End::Refused(format!(
            "the {api:?} answer is over 2 GiB; nothing was sent"
        ))
    })?;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{
        ApiVersionsRequest, MetadataRequest, ProduceRequest, RequestHeader, TopicName,
    };
    use kafka_protocol::protocol::{Encodable, StrBytes, encode_request_header_into_buffer};
    use kafka_protocol::records::Compression;

    use super::*;
    use crate::kafka::records::tests::{encode, kafka_record};

    fn frame(api: ApiKey, version: i16, body: &impl Encodable) -> Bytes {
        let mut header = RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = 7;
        header.client_id = Some(StrBytes::from_static_str("test"));
        let mut buf = BytesMut::new();
        encode_request_header_into_buffer(&mut buf, &header).unwrap();
        body.encode(&mut buf, version).unwrap();
        buf.freeze()
    }

    fn batch(compression: Compression) -> Bytes {
        let records: Vec<_> = (0..3)
            .map(|i| kafka_record(i, (i > 0).then_some(&b"key"[..]), Some(b"value")))
            .collect();
        encode(&records, compression)
    }

    fn produce() -> ProduceRequest {
        let mut partition = PartitionProduceData::default();
        partition.records = Some(batch(Compression::Lz4));
        let mut topic = TopicProduceData::default();
        topic.name = TopicName(StrBytes::from_static_str("t"));
        topic.partition_data = vec![partition];
        let mut request = ProduceRequest::default();
        request.acks = -1;
        request.topic_data = vec![topic];
        request
    }

    /// What a client sends is read as the connection reads it: requests,
    /// an ApiVersions in a version not served (KIP-511), a served API in a
    /// version not served, a body cut short, and garbage.
    #[test]
    fn frames_parse_into_what_the_connection_does_with_them() {
        let produce_frame = frame(ApiKey::Produce, 9, &produce());
        assert!(matches!(
            parse_frame(produce_frame.clone()),
            ParsedFrame::Request(ApiKey::Produce, _, _)
        ));
        assert!(matches!(
            parse_frame(frame(
                ApiKey::ApiVersions,
                4,
                &ApiVersionsRequest::default()
            )),
            ParsedFrame::ApiVersionsUnsupported { correlation_id: 7 }
        ));
        assert!(matches!(
            parse_frame(frame(ApiKey::Metadata, 12, &MetadataRequest::default())),
            ParsedFrame::Unsupported(ApiKey::Metadata, _)
        ));
        assert!(matches!(
            parse_frame(produce_frame.slice(..produce_frame.len() - 10)),
            ParsedFrame::Malformed(ApiKey::Produce, _, _)
        ));
        for garbage in [
            &[0xffu8; 12][..],
            &[0x00, 0x00, 0x7f, 0x00, 0, 0, 0, 1, 0, 0],
        ] {
            assert!(matches!(
                parse_frame(Bytes::copy_from_slice(garbage)),
                ParsedFrame::Refused(_)
            ));
        }
        assert!(matches!(
            parse_frame(Bytes::from_static(b"short")),
            ParsedFrame::Refused(_)
        ));
    }

    /// A frame of a few bytes whose arrays claim billions of entries is
    /// malformed, and costs nothing: the codec (patched, vendor/README.md)
    /// no longer reserves what a length claims before reading it. Unpatched,
    /// this test aborts the process.
    #[test]
    fn lying_array_lengths_are_malformed_not_reserved() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&(ApiKey::Produce as i16).to_be_bytes());
        frame.extend_from_slice(&3i16.to_be_bytes()); // version 3: plain arrays
        frame.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        frame.extend_from_slice(&(-1i16).to_be_bytes()); // no client id
        frame.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
        frame.extend_from_slice(&(-1i16).to_be_bytes()); // acks
        frame.extend_from_slice(&1000i32.to_be_bytes()); // timeout
        frame.extend_from_slice(&i32::MAX.to_be_bytes()); // topics: 2^31 - 1
        assert!(matches!(
            parse_frame(Bytes::from(frame.clone())),
            ParsedFrame::Malformed(ApiKey::Produce, _, _)
        ));
        // The same lie in a compact (flexible, v9) array.
        let mut flexible = Vec::new();
        flexible.extend_from_slice(&(ApiKey::Produce as i16).to_be_bytes());
        flexible.extend_from_slice(&9i16.to_be_bytes());
        flexible.extend_from_slice(&7i32.to_be_bytes());
        flexible.extend_from_slice(&(-1i16).to_be_bytes()); // client id
        flexible.push(0); // no tagged fields
        flexible.push(0); // null transactional id (compact)
        flexible.extend_from_slice(&(-1i16).to_be_bytes());
        flexible.extend_from_slice(&1000i32.to_be_bytes());
        flexible.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x07]); // 2^31 - 1 + 1
        assert!(matches!(
            parse_frame(Bytes::from(flexible)),
            ParsedFrame::Malformed(ApiKey::Produce, _, _)
        ));
    }

    /// Writes the `kafka_frame` fuzz target's seeds (fuzz/seeds/kafka_frame):
    /// `cargo test -p sluice-broker --lib write_kafka_fuzz_seeds -- --ignored`.
    /// The first byte selects what the target reads: 0 a frame, 1 a batch.
    #[test]
    #[ignore = "writes fuzz seeds"]
    fn write_kafka_fuzz_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/kafka_frame");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, selector: u8, bytes: &[u8]| {
            let mut data = vec![selector];
            data.extend_from_slice(bytes);
            std::fs::write(dir.join(name), data).unwrap();
        };
        for (name, codec) in [
            ("none", Compression::None),
            ("gzip", Compression::Gzip),
            ("snappy", Compression::Snappy),
            ("lz4", Compression::Lz4),
            ("zstd", Compression::Zstd),
        ] {
            write(&format!("batch-{name}"), 1, &batch(codec));
        }
        write("frame-produce", 0, &frame(ApiKey::Produce, 9, &produce()));
        write(
            "frame-api-versions",
            0,
            &frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default()),
        );
        write(
            "frame-metadata",
            0,
            &frame(ApiKey::Metadata, 9, &MetadataRequest::default()),
        );
    }
}
