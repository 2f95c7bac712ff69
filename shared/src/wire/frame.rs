//! Length-prefixed JSON framing for control messages: a 4-byte big-endian length, then
//! that many bytes of JSON. [`FrameCodec`] is sans-IO: bytes in, messages out; it also
//! implements tokio-util's `Decoder`/`Encoder` so shells can wrap a QUIC stream in
//! `FramedRead`/`FramedWrite` without re-implementing it.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Why a control frame was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the cap.
    #[error("control frame of {len} bytes exceeds the {max}-byte cap")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The body is not a valid message (bad JSON, unknown type, missing field).
    #[error("malformed control frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("control stream ended inside a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `M` frames and decodes `D` frames, refusing bodies over `max_len` bytes.
#[derive(Debug)]
pub struct FrameCodec<D, E> {
    max_len: usize,
    _types: PhantomData<fn(E) -> D>,
}

impl<D, E> Clone for FrameCodec<D, E> {
    fn clone(&self) -> Self {
        Self::new(self.max_len)
    }
}

impl<D, E> FrameCodec<D, E> {
    /// A codec that refuses frames whose body exceeds `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self { max_len, _types: PhantomData }
    }

    /// Changes the cap (a relay allows only a small hello before authentication).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }
}

impl<D: DeserializeOwned, E: Serialize> FrameCodec<D, E> {
    /// Appends one encoded frame to `dst`. Encoding a message larger than the cap fails,
    /// so a sender never produces a frame its peer must reject.
    pub fn encode_into(&self, msg: &E, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if body.len() > self.max_len {
            return Err(FrameError::TooLarge { len: body.len(), max: self.max_len });
        }
        dst.reserve(LENGTH_PREFIX + body.len());
        dst.put_u32(body.len() as u32);
        dst.put_slice(&body);
        Ok(())
    }

    /// Takes one complete frame off the front of `src` if there is one. An oversized
    /// length prefix is rejected before its body is buffered.
    pub fn decode_from(&self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        if src.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge { len, max: self.max_len });
        }
        if src.len() < LENGTH_PREFIX + len {
            src.reserve(LENGTH_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let body = src.split_to(len);
        serde_json::from_slice(&body).map(Some).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

impl<D: DeserializeOwned, E: Serialize> tokio_util::codec::Decoder for FrameCodec<D, E> {
    type Item = D;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        self.decode_from(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        match self.decode_from(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated),
        }
    }
}

impl<D: DeserializeOwned, E: Serialize> tokio_util::codec::Encoder<E> for FrameCodec<D, E> {
    type Error = FrameError;

    fn encode(&mut self, msg: E, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_into(&msg, dst)
    }
}

impl<D: DeserializeOwned, E: Serialize> tokio_util::codec::Encoder<&E> for FrameCodec<D, E> {
    type Error = FrameError;

    fn encode(&mut self, msg: &E, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_into(msg, dst)
    }
}

/// The codec a relay uses on a client's control stream.
pub type RelaySideCodec = FrameCodec<super::control::ClientMessage, super::control::RelayMessage>;
/// The codec a client uses on its control stream.
pub type ClientSideCodec = FrameCodec<super::control::RelayMessage, super::control::ClientMessage>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::{ClientMessage, RelayMessage};
    use proptest::prelude::*;

    fn client_codec() -> ClientSideCodec {
        FrameCodec::new(1024)
    }

    fn relay_codec() -> RelaySideCodec {
        FrameCodec::new(1024)
    }

    fn arb_client_message() -> impl Strategy<Value = ClientMessage> {
        prop_oneof![
            (any::<u32>(), ".{0,40}", "[a-z0-9-]{0,16}").prop_map(|(protocol, token, instance)| {
                ClientMessage::Hello {
                    protocol,
                    token: crate::config::Secret::new(token),
                    instance,
                    lease: None,
                    network: None,
                    tun: false,
                    existing_only: false,
                }
            }),
            (any::<u64>(), any::<u16>()).prop_map(|(req, port)| ClientMessage::Listen { req, port }),
            any::<u16>().prop_map(|port| ClientMessage::Unlisten { port }),
            (any::<u64>(), any::<u16>()).prop_map(|(req, port)| ClientMessage::Bind { req, port }),
            any::<u16>().prop_map(|port| ClientMessage::Unbind { port }),
            (any::<u64>(), any::<[u8; 4]>(), any::<u16>()).prop_map(|(req, ip, port)| {
                ClientMessage::Connect { req, to: std::net::SocketAddrV4::new(ip.into(), port) }
            }),
            any::<u64>().prop_map(|socket| ClientMessage::Accept { socket }),
            any::<u64>().prop_map(|socket| ClientMessage::Deny { socket }),
            any::<u64>().prop_map(|socket| ClientMessage::Close { socket }),
            any::<u64>().prop_map(|nonce| ClientMessage::Ping { nonce }),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_round_trip(msgs in proptest::collection::vec(arb_client_message(), 1..8), split in 0usize..64) {
            let enc = client_codec();
            let dec = relay_codec();
            let mut wire = BytesMut::new();
            for m in &msgs {
                enc.encode_into(m, &mut wire).unwrap();
            }
            // Feed the bytes in two parts to exercise partial frames.
            let split = split.min(wire.len());
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            while let Some(m) = dec.decode_from(&mut buf).unwrap() { out.push(m); }
            buf.extend_from_slice(&wire[split..]);
            while let Some(m) = dec.decode_from(&mut buf).unwrap() { out.push(m); }
            prop_assert_eq!(out, msgs);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let dec = relay_codec();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = dec.decode_from(&mut buf) {}
        }
    }

    #[test]
    fn relay_messages_round_trip() {
        let msgs = vec![
            RelayMessage::Welcome {
                protocol: 1,
                session: 7,
                network: "default".into(),
                vip: "10.77.0.2".parse().unwrap(),
                subnet: "10.77.0.0/16".parse().unwrap(),
                max_datagram_payload: 1100,
                idle_timeout_ms: 10_000,
                lease: Some("a.b.c".into()),
            },
            RelayMessage::Failed { req: 3, code: crate::ErrorCode::Refused, message: "x".into() },
            RelayMessage::SocketClosed { socket: 9, code: crate::ErrorCode::SessionLost },
        ];
        let (enc, dec) = (relay_codec(), client_codec());
        let mut wire = BytesMut::new();
        for m in &msgs {
            enc.encode_into(m, &mut wire).unwrap();
        }
        let mut out = Vec::new();
        while let Some(m) = dec.decode_from(&mut wire).unwrap() {
            out.push(m);
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn oversized_prefix_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0u8, 1, 0, 0][..]); // 65536 bytes announced
        let err = relay_codec().decode_from(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 65536, max: 1024 }));
    }

    #[test]
    fn unknown_type_and_unknown_field_are_malformed() {
        for body in [&br#"{"type":"launch_missiles"}"#[..], br#"{"type":"ping","nonce":1,"extra":2}"#, b"not json"] {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            let err = relay_codec().decode_from(&mut buf).unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        }
    }
}
