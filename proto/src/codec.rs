//! The gRPC codec of weir.v1: prost, with the contract's size rules checked on the encoded bytes
//! before anything is decoded, and messages that can be encoded once and sent many times.
//!
//! A protobuf message can decode to far more memory than it takes on the wire: an empty
//! `VersionStats` is two bytes encoded and about a hundred decoded. So a `Report`'s top-level
//! `stats` entries are counted on the raw bytes first, and a report with more than
//! [`MAX_STATS_PER_REPORT`] is refused (`INVALID_ARGUMENT`) without being decoded. With the
//! server's message-size limit, that bounds what one report can make the controller allocate.
//!
//! The controller sends the same directive to every Envoy: [`Encoded`] holds a message's bytes,
//! encoded once and shared, and the server's stream carries [`Outgoing`] messages, either encoded
//! already or not, which the encoder writes as they are.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::v1::{ControllerMessage, Report};

/// Initial size of the encode and decode buffers of every stream (tonic's default is 8 KiB
/// each). A report is about 400 bytes, a directive a few hundred; the buffers grow when a larger
/// message needs it (up to the server's message-size limit), so this bounds nothing: it is what
/// every one of 10,000 connected Envoys costs the controller before it sends anything large.
pub const STREAM_BUFFER_BYTES: usize = 1024;

/// A message encoded once, to be sent on many streams: the bytes are shared, not copied, until
/// the encoder writes them into a stream's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    bytes: Bytes,
}

impl Encoded {
    /// Encodes `message`.
    pub fn of(message: &ControllerMessage) -> Self {
        Self {
            bytes: Bytes::from(message.encode_to_vec()),
        }
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// What the controller sends down an `Exchange` stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A message to encode (an acknowledgement: different on every stream).
    Message(ControllerMessage),
    /// A message encoded before (a directive: the same for every stream).
    Encoded(Encoded),
}

/// How a message gets onto the wire.
pub trait Encode {
    /// Writes the encoded message into `buf`.
    fn encode_into(self, buf: &mut impl BufMut) -> Result<(), Status>;
}

fn encode_error(e: prost::EncodeError) -> Status {
    Status::internal(format!("cannot encode a weir.v1 message: {e}"))
}

impl<M: Message> Encode for M {
    fn encode_into(self, buf: &mut impl BufMut) -> Result<(), Status> {
        self.encode(buf).map_err(encode_error)
    }
}

impl Encode for Outgoing {
    fn encode_into(self, buf: &mut impl BufMut) -> Result<(), Status> {
        match self {
            Outgoing::Message(message) => message.encode(buf).map_err(encode_error),
            Outgoing::Encoded(encoded) => {
                let bytes = encoded.bytes;
                // What prost checks for a message it encodes (put_slice would panic instead).
                if buf.remaining_mut() < bytes.len() {
                    return Err(Status::internal(format!(
                        "cannot encode a weir.v1 message: {} bytes needed, {} left in the buffer",
                        bytes.len(),
                        buf.remaining_mut()
                    )));
                }
                buf.put_slice(&bytes);
                Ok(())
            }
        }
    }
}

/// Most `stats` entries in one report (a reporter with more splits them over several reports).
pub const MAX_STATS_PER_REPORT: usize = 1024;

/// A check on a message's encoded bytes before it is decoded.
pub trait Precheck {
    /// Refuses bytes that must not be decoded.
    fn precheck(_bytes: &[u8]) -> Result<(), Status> {
        Ok(())
    }
}

impl Precheck for crate::v1::ControllerMessage {}

impl Precheck for Report {
    fn precheck(bytes: &[u8]) -> Result<(), Status> {
        match count_field(bytes, 5) {
            Some(n) if n <= MAX_STATS_PER_REPORT => Ok(()),
            Some(n) => Err(Status::invalid_argument(format!(
                "report carries {n} stats entries; weir.v1 allows at most {MAX_STATS_PER_REPORT} per report (split the delta over several reports)"
            ))),
            None => Err(Status::invalid_argument(
                "report is not a valid weir.v1 Report (its fields do not parse)",
            )),
        }
    }
}

/// Counts the occurrences of a length-delimited `field` at the top level of a message; None if
/// the bytes are not a well-formed sequence of fields. Groups (wire types 3 and 4, from proto2)
/// are skipped whole, as prost skips them in unknown fields.
fn count_field(mut bytes: &[u8], field: u64) -> Option<usize> {
    let mut count = 0;
    while !bytes.is_empty() {
        let (number, wire_type) = skip_field(&mut bytes, 0)?;
        count += usize::from(number == field && wire_type == 2);
    }
    Some(count)
}

/// prost's limit on nested messages and groups.
const MAX_DEPTH: u32 = 100;

/// Reads one field's key and skips its value; returns its number and wire type. An end-group
/// key returns wire type 4 with nothing skipped.
fn skip_field(bytes: &mut &[u8], depth: u32) -> Option<(u64, u64)> {
    let key = prost::encoding::decode_varint(bytes).ok()?;
    let wire_type = key & 7;
    let number = key >> 3;
    match wire_type {
        0 => {
            prost::encoding::decode_varint(bytes).ok()?;
        }
        1 => *bytes = bytes.get(8..)?,
        5 => *bytes = bytes.get(4..)?,
        2 => {
            let len = usize::try_from(prost::encoding::decode_varint(bytes).ok()?).ok()?;
            *bytes = bytes.get(len..)?;
        }
        3 => {
            if depth >= MAX_DEPTH {
                return None;
            }
            // Up to the end-group key of the same number.
            loop {
                match skip_field(bytes, depth + 1)? {
                    (end, 4) if end == number => break,
                    (_, 4) => return None,
                    _ => {}
                }
            }
        }
        4 if depth > 0 => {}
        _ => return None,
    }
    Some((number, wire_type))
}

/// prost's codec with [`Precheck`] on every decoded message.
#[derive(Debug, Clone, Copy)]
pub struct CheckedCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Encode + Send + 'static,
    U: Message + Default + Precheck + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = CheckedEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        CheckedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// The encoder of [`CheckedCodec`]: prost's, or the bytes of an [`Encoded`] message.
#[derive(Debug)]
pub struct CheckedEncoder<T>(PhantomData<T>);

impl<T: Encode> Encoder for CheckedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode_into(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, DEFAULT_YIELD_THRESHOLD)
    }
}

/// tonic's default: how much encoded data a stream gathers before it yields to the transport.
const DEFAULT_YIELD_THRESHOLD: usize = 32 * 1024;

/// The decoder of [`CheckedCodec`]: [`Precheck`], then prost.
#[derive(Debug)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Precheck> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        // The buffer holds exactly one whole message, contiguous.
        U::precheck(buf.chunk())?;
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("not a valid weir.v1 message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, DEFAULT_YIELD_THRESHOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::VersionStats;

    fn report(entries: usize) -> Vec<u8> {
        Report {
            sequence: 3,
            stats: vec![VersionStats::default(); entries],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn stats_entries_are_counted_on_the_wire_before_decoding() {
        assert_eq!(count_field(&report(0), 5), Some(0));
        assert_eq!(count_field(&report(7), 5), Some(7));
        assert!(Report::precheck(&report(MAX_STATS_PER_REPORT)).is_ok());
        let refused = Report::precheck(&report(MAX_STATS_PER_REPORT + 1)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("at most 1024"), "{refused:?}");
    }

    #[test]
    fn an_encoded_message_goes_on_the_wire_as_the_message_itself() {
        use crate::v1::controller_message::Kind;
        use crate::v1::{Ack, Directive};
        let directive = ControllerMessage {
            kind: Some(Kind::Directive(Directive {
                generation: 7,
                canaries: Vec::new(),
            })),
        };
        let mut once = Vec::new();
        Outgoing::Encoded(Encoded::of(&directive))
            .encode_into(&mut once)
            .unwrap();
        assert_eq!(once, directive.encode_to_vec());
        assert_eq!(
            ControllerMessage::decode(once.as_slice()).unwrap(),
            directive
        );
        let ack = ControllerMessage {
            kind: Some(Kind::Ack(Ack {
                epoch: 1,
                sequence: 2,
            })),
        };
        let mut each = Vec::new();
        Outgoing::Message(ack.clone())
            .encode_into(&mut each)
            .unwrap();
        assert_eq!(each, ack.encode_to_vec());
        // A buffer too small for the bytes is an error, not a truncated message.
        let mut small = [0u8; 2];
        assert!(Outgoing::Encoded(Encoded::of(&directive))
            .encode_into(&mut &mut small[..])
            .is_err());
    }

    #[test]
    fn groups_are_skipped_as_prost_skips_them() {
        // Found by the fuzz target over report validation: an unknown field of wire type 3
        // (a proto2 group) decodes with prost, so the wire check must not refuse it.
        let mut bytes = vec![0x5b, 0x08, 0x01, 0x5c]; // group 11 { field 1: 1 } end group 11
        bytes.extend(report(2));
        assert_eq!(count_field(&bytes, 5), Some(2));
        assert!(Report::decode(bytes.as_slice()).is_ok());
        assert!(Report::precheck(&bytes).is_ok());
        // Stats entries inside a group are not the report's.
        assert_eq!(count_field(&[0x5b, 0x2a, 0x00, 0x5c], 5), Some(0));
        // An end without its start, or another group's end, is not a message.
        assert!(Report::precheck(&[0x5c]).is_err());
        assert!(Report::precheck(&[0x5b, 0x64]).is_err());
    }

    #[test]
    fn bytes_that_are_not_fields_are_refused() {
        assert!(Report::precheck(&[0x2a, 0x7f]).is_err()); // field 5, length 127, no bytes
        assert!(Report::precheck(&[0x0f]).is_err()); // wire type 7
        assert!(Report::precheck(&[0x5b]).is_err()); // a group that never ends
        assert!(Report::precheck(&[0x80]).is_err()); // truncated varint
    }
}
