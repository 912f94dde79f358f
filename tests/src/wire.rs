//! Requests as they go on the wire, including the ones a well-behaved client library never
//! builds: `Struct` inputs with numbers beyond what serde can carry into a `Struct` (2^53 and
//! over, NaN, infinities), values with no kind set, and bodies that are not protobuf at all.

use std::time::Duration;

use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value};
use prost::bytes::{Buf, BufMut};
use serde_json::Value as Json;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// The client API's service, as the paths of its methods start.
pub const SERVICE: &str = "/sagad.v1.SagaOrchestrator";

/// A number as the wire carries it: a double, whatever its value.
pub fn number(value: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(value)),
    }
}

pub fn string(value: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.into())),
    }
}

/// A `google.protobuf.Value` with its oneof left unset.
pub fn no_kind() -> Value {
    Value { kind: None }
}

pub fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

pub fn object(fields: Struct) -> Value {
    Value {
        kind: Some(Kind::StructValue(fields)),
    }
}

/// JSON to a wire `Value`. Unlike serde's conversion (which refuses integers of 2^53 and
/// over), every number becomes the nearest double, as a client in any language would send it.
pub fn value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(flag) => Kind::BoolValue(*flag),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(text) => Kind::StringValue(text.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(value).collect(),
        }),
        Json::Object(fields) => Kind::StructValue(Struct {
            fields: fields
                .iter()
                .map(|(key, field)| (key.clone(), value(field)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// A JSON object's fields as a wire `Struct` (see [`value`]); anything but an object gives an
/// empty `Struct`.
pub fn fields(json: &Json) -> Struct {
    match value(json).kind {
        Some(Kind::StructValue(fields)) => fields,
        _ => Struct::default(),
    }
}

/// Equality as a JSON document sees it: numbers by value, a value with no kind as null.
pub fn same_value(a: &Value, b: &Value) -> bool {
    let null = Kind::NullValue(0);
    match (
        a.kind.as_ref().unwrap_or(&null),
        b.kind.as_ref().unwrap_or(&null),
    ) {
        (Kind::NullValue(_), Kind::NullValue(_)) => true,
        (Kind::NumberValue(x), Kind::NumberValue(y)) => x == y,
        (Kind::StringValue(x), Kind::StringValue(y)) => x == y,
        (Kind::BoolValue(x), Kind::BoolValue(y)) => x == y,
        (Kind::StructValue(x), Kind::StructValue(y)) => same_struct(x, y),
        (Kind::ListValue(x), Kind::ListValue(y)) => {
            x.values.len() == y.values.len()
                && x.values
                    .iter()
                    .zip(&y.values)
                    .all(|(x, y)| same_value(x, y))
        }
        _ => false,
    }
}

pub fn same_struct(a: &Struct, b: &Struct) -> bool {
    a.fields.len() == b.fields.len()
        && a.fields
            .iter()
            .all(|(key, x)| b.fields.get(key).is_some_and(|y| same_value(x, y)))
}

/// Sends its bytes as the message, unchecked, and hands back the reply's bytes: a client
/// that can put anything on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug)]
pub struct RawEncoder;

#[derive(Debug)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Calls `method` of the client API with `body` as the request message, as is. The outer
/// error is the test's own trouble (a bad path, a channel that will not serve); the inner
/// result is sagad's answer: the reply's bytes or its status.
pub async fn call_raw(
    channel: Channel,
    method: &str,
    body: Vec<u8>,
    timeout: Option<Duration>,
) -> anyhow::Result<Result<Vec<u8>, tonic::Status>> {
    call_raw_as(channel, method, body, timeout, None).await
}

/// [`call_raw`] with `authorization: Bearer <token>` when a token is given.
pub async fn call_raw_as(
    channel: Channel,
    method: &str,
    body: Vec<u8>,
    timeout: Option<Duration>,
    token: Option<&str>,
) -> anyhow::Result<Result<Vec<u8>, tonic::Status>> {
    let path = PathAndQuery::try_from(format!("{SERVICE}/{method}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut request = tonic::Request::new(body);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(grpc
        .unary(request, path, RawCodec)
        .await
        .map(tonic::Response::into_inner))
}
