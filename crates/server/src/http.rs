//! The HTTP side (axum): `POST /json`, `GET /healthcheck`, `GET /metrics`, `GET /rlconfig`.
//!
//! `POST /json` takes a `RateLimitRequest` and answers a `RateLimitResponse`, both in
//! protobuf's JSON mapping (camelCase names, enums by name, 64-bit integers as strings or
//! numbers, durations as `"1.5s"`, default values omitted), as the reference service's `/json`:
//! 200 for `OK`, 429 for `OVER_LIMIT`, 400 for a bad request, 503 when the store failed under
//! the `closed` policy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use crate::config::Unit;
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::metrics::ServerMetrics;
use crate::service::RateLimitService;

/// What the HTTP routes share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The service.
    pub service: Arc<RateLimitService>,
    /// Set when shutting down: `/healthcheck` then answers 503 so balancers drain this
    /// instance.
    pub draining: Arc<AtomicBool>,
}

/// The router of every HTTP route.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/json", post(json_handler))
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route("/rlconfig", get(rlconfig))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .with_state(state)
}

async fn json_handler(State(state): State<HttpState>, body: Bytes) -> Response {
    let request = match request_from_json(&body) {
        Ok(request) => request,
        Err(err) => {
            state.service.metrics().invalid_request();
            return (StatusCode::BAD_REQUEST, format!("invalid request: {err}\n")).into_response();
        }
    };
    match state.service.should_rate_limit(&request).await {
        Ok(response) => {
            let status = if response.overall_code == i32::from(Code::OverLimit) {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            };
            (status, axum::Json(response_to_json(&response))).into_response()
        }
        Err(err) => {
            let status = match err.code() {
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, format!("{}\n", err.message())).into_response()
        }
    }
}

async fn healthcheck(State(state): State<HttpState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match state.service.config_error() {
        None => (StatusCode::OK, "OK\n").into_response(),
        // Still serving with the previous configuration: healthy, but say why not current.
        Some(err) => (
            StatusCode::OK,
            format!(
                "OK (serving configuration {}; the last reload was refused: {err})\n",
                state.service.config().version()
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match state.service.metrics().encode() {
        Ok(text) => ([(header::CONTENT_TYPE, ServerMetrics::CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn rlconfig(State(state): State<HttpState>) -> Response {
    let config = state.service.config();
    axum::Json(json!({
        "version": config.version(),
        "last_error": state.service.config_error(),
        "files": config.files(),
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Protobuf JSON mapping of the request and response.

/// A `RateLimitRequest` in protobuf's JSON mapping.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<JsonDescriptor>,
    #[serde(
        default,
        alias = "hits_addend",
        rename = "hitsAddend",
        deserialize_with = "u32_of"
    )]
    hits_addend: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    #[serde(default)]
    entries: Vec<JsonEntry>,
    #[serde(default)]
    limit: Option<JsonOverride>,
    #[serde(
        default,
        alias = "hits_addend",
        rename = "hitsAddend",
        deserialize_with = "opt_u64_of"
    )]
    hits_addend: Option<u64>,
    #[serde(default, alias = "is_negative_hits", rename = "isNegativeHits")]
    is_negative_hits: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOverride {
    #[serde(
        default,
        alias = "requests_per_unit",
        rename = "requestsPerUnit",
        deserialize_with = "u32_of"
    )]
    requests_per_unit: u32,
    #[serde(default, deserialize_with = "unit_of")]
    unit: i32,
}

/// Parses a `RateLimitRequest` from protobuf JSON.
///
/// # Errors
/// The JSON error.
pub fn request_from_json(body: &[u8]) -> Result<RateLimitRequest, serde_json::Error> {
    let json: JsonRequest = serde_json::from_slice(body)?;
    Ok(RateLimitRequest {
        domain: json.domain,
        descriptors: json
            .descriptors
            .into_iter()
            .map(|d| RateLimitDescriptor {
                entries: d
                    .entries
                    .into_iter()
                    .map(|e| Entry {
                        key: e.key,
                        value: e.value,
                    })
                    .collect(),
                limit: d.limit.map(|l| RateLimitOverride {
                    requests_per_unit: l.requests_per_unit,
                    unit: l.unit,
                }),
                hits_addend: d.hits_addend.map(|value| UInt64Value { value }),
                is_negative_hits: d.is_negative_hits,
            })
            .collect(),
        hits_addend: json.hits_addend,
    })
}

/// A JSON number or a string holding one (protobuf JSON writes 64-bit integers as strings).
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    Text(String),
}

impl NumberOrString {
    fn value<E: serde::de::Error>(self) -> Result<u64, E> {
        match self {
            Self::Number(n) => Ok(n),
            Self::Text(text) => text
                .parse()
                .map_err(|_| E::custom(format!("{text:?} is not an unsigned integer"))),
        }
    }
}

fn u32_of<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let value = NumberOrString::deserialize(deserializer)?.value::<D::Error>()?;
    u32::try_from(value).map_err(|_| serde::de::Error::custom(format!("{value} is out of range")))
}

fn opt_u64_of<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Option::<NumberOrString>::deserialize(deserializer)?
        .map(NumberOrString::value::<D::Error>)
        .transpose()
}

fn unit_of<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrName {
        Number(i32),
        Name(String),
    }
    Ok(match NumberOrName::deserialize(deserializer)? {
        NumberOrName::Number(n) => n,
        NumberOrName::Name(name) if name == "UNKNOWN" => 0,
        NumberOrName::Name(name) => Unit::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(&name))
            .map(Unit::proto_number)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown unit {name:?}")))?,
    })
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("UNKNOWN", |c| c.as_str_name())
}

/// A `RateLimitResponse` in protobuf's JSON mapping (fields with default values omitted).
pub fn response_to_json(response: &RateLimitResponse) -> Value {
    let mut out = Map::new();
    if response.overall_code != 0 {
        out.insert(
            "overallCode".into(),
            code_name(response.overall_code).into(),
        );
    }
    let statuses: Vec<Value> = response
        .statuses
        .iter()
        .map(|status| {
            let mut s = Map::new();
            if status.code != 0 {
                s.insert("code".into(), code_name(status.code).into());
            }
            if let Some(limit) = &status.current_limit {
                let mut l = Map::new();
                if !limit.name.is_empty() {
                    l.insert("name".into(), limit.name.clone().into());
                }
                if limit.requests_per_unit != 0 {
                    l.insert("requestsPerUnit".into(), limit.requests_per_unit.into());
                }
                if let Some(unit) = Unit::from_proto_number(limit.unit) {
                    l.insert("unit".into(), unit.as_str().to_ascii_uppercase().into());
                }
                s.insert("currentLimit".into(), Value::Object(l));
            }
            if status.limit_remaining != 0 {
                s.insert("limitRemaining".into(), status.limit_remaining.into());
            }
            if let Some(d) = &status.duration_until_reset {
                s.insert(
                    "durationUntilReset".into(),
                    duration_text(d.seconds, d.nanos).into(),
                );
            }
            Value::Object(s)
        })
        .collect();
    if !statuses.is_empty() {
        out.insert("statuses".into(), Value::Array(statuses));
    }
    if !response.response_headers_to_add.is_empty() {
        let headers: Vec<Value> = response
            .response_headers_to_add
            .iter()
            .map(|h| json!({"key": h.key, "value": h.value}))
            .collect();
        out.insert("responseHeadersToAdd".into(), Value::Array(headers));
    }
    Value::Object(out)
}

/// A protobuf JSON duration: seconds with 0, 3, 6 or 9 fractional digits and an `s`.
fn duration_text(seconds: i64, nanos: i32) -> String {
    if nanos == 0 {
        format!("{seconds}s")
    } else if nanos % 1_000_000 == 0 {
        format!("{seconds}.{:03}s", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{seconds}.{:06}s", nanos / 1_000)
    } else {
        format!("{seconds}.{nanos:09}s")
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
        DescriptorStatus, RateLimit,
    };
    use envoy_types::pb::google::protobuf::Duration;

    use super::*;

    #[test]
    fn requests_parse_in_both_spellings() {
        let request = request_from_json(
            br#"{"domain":"d","hitsAddend":2,"descriptors":[
                {"entries":[{"key":"k","value":"v"}],"hitsAddend":"5"},
                {"entries":[{"key":"k2"}],"hits_addend":0,"limit":{"requestsPerUnit":3,"unit":"MINUTE"}}]}"#,
        )
        .unwrap();
        assert_eq!(request.domain, "d");
        assert_eq!(request.hits_addend, 2);
        assert_eq!(
            request.descriptors[0].hits_addend,
            Some(UInt64Value { value: 5 })
        );
        assert_eq!(
            request.descriptors[1].hits_addend,
            Some(UInt64Value { value: 0 })
        );
        assert_eq!(request.descriptors[1].entries[0].value, "");
        let limit = request.descriptors[1].limit.unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (3, 2));
        assert!(request_from_json(br#"{"domain":"d","bogus":1}"#).is_err());
        assert!(request_from_json(br#"{"domain":"d","hitsAddend":-1}"#).is_err());
    }

    #[test]
    fn responses_use_the_protobuf_json_mapping() {
        let response = RateLimitResponse {
            overall_code: Code::OverLimit.into(),
            statuses: vec![
                DescriptorStatus {
                    code: Code::OverLimit.into(),
                    current_limit: Some(RateLimit {
                        name: "per_ip".into(),
                        requests_per_unit: 10,
                        unit: Unit::Second.proto_number(),
                    }),
                    limit_remaining: 0,
                    duration_until_reset: Some(Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                    ..DescriptorStatus::default()
                },
                DescriptorStatus {
                    code: Code::Ok.into(),
                    ..DescriptorStatus::default()
                },
            ],
            ..RateLimitResponse::default()
        };
        assert_eq!(
            response_to_json(&response),
            json!({
                "overallCode": "OVER_LIMIT",
                "statuses": [
                    {"code": "OVER_LIMIT",
                     "currentLimit": {"name": "per_ip", "requestsPerUnit": 10, "unit": "SECOND"},
                     "durationUntilReset": "0.100s"},
                    {"code": "OK"}
                ]
            })
        );
        assert_eq!(duration_text(3, 0), "3s");
        assert_eq!(duration_text(3, 1), "3.000000001s");
        assert_eq!(duration_text(3, 1_000), "3.000001s");
    }
}
