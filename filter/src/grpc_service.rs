//! The first argument of `open_grpc_stream`: a serialized `envoy.config.core.v3.GrpcService`.
//!
//! Envoy first tries to parse that argument as a `GrpcService` and only treats it as a cluster name
//! when it does not parse. Opened by cluster name, the stream's `:authority` is the cluster name,
//! and Istio's cluster names (`outbound|9090||weir.weir-system.svc.cluster.local`) hold `|`, which
//! is not valid there: the controller's HTTP/2 server resets every such stream (measured with
//! Envoy 1.40). `envoy_grpc { cluster_name, authority }` keeps Istio's cluster (and with it Istio's
//! mTLS and the workload's certificate) and sends the Service's host name as the authority.
//!
//! Only the two fields Weir sets are declared (hand-written prost types rather than Envoy's whole
//! API, which would multiply the module's size for two strings).

use prost::Message;

/// `envoy.config.core.v3.GrpcService`, with only its `envoy_grpc` field.
#[derive(Clone, PartialEq, Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`, with only `cluster_name` and `authority`.
#[derive(Clone, PartialEq, Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

/// The serialized `GrpcService` for a stream over `cluster` with `authority`, as the `&str` the
/// SDK's `open_grpc_stream` takes. None when the encoding is not valid UTF-8, which happens only
/// when a length needs a second varint byte; the configuration keeps both names short enough
/// (`config::FilterConfig::parse`), so None means a caller skipped that check.
pub fn encode(cluster: &str, authority: &str) -> Option<String> {
    let service = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_string(),
            authority: authority.to_string(),
        }),
    };
    String::from_utf8(service.encode_to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_round_trips_with_cluster_and_authority() {
        let bytes = encode(
            "outbound|9090||weir.weir-system.svc.cluster.local",
            "weir.weir-system.svc.cluster.local",
        )
        .unwrap();
        let decoded = GrpcService::decode(bytes.as_bytes()).unwrap();
        let grpc = decoded.envoy_grpc.unwrap();
        assert_eq!(
            grpc.cluster_name,
            "outbound|9090||weir.weir-system.svc.cluster.local"
        );
        assert_eq!(grpc.authority, "weir.weir-system.svc.cluster.local");
        // Field 1, length-delimited; then the nested message's own field 1.
        assert_eq!(&bytes.as_bytes()[..1], &[0x0a]);
        assert_eq!(bytes.as_bytes()[2], 0x0a);
    }

    #[test]
    fn names_too_long_for_one_byte_lengths_are_not_encoded() {
        assert!(encode(&"c".repeat(100), &"a".repeat(30)).is_none());
        assert!(encode(&"c".repeat(60), &"a".repeat(63)).is_some());
    }
}
