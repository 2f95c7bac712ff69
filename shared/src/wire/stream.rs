//! The header a client writes first on each QUIC stream it opens for a virtual socket:
//!
//! ```text
//! 0..2   magic "OV"
//! 2      version (1)
//! 3      kind (0x01 = attach to a socket pair)
//! 4..12  socket id, big-endian u64
//! ```
//! The relay matches the stream to the pair and splices it to the other side's stream.

use super::control::SocketId;

/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
const MAGIC: [u8; 2] = *b"OV";
const VERSION: u8 = 1;
/// Kind byte: attach this stream to an accepted or connected socket.
pub const KIND_ATTACH: u8 = 0x01;

/// The stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// The socket this stream carries.
    pub socket: SocketId,
}

/// Why a stream header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamHeaderError {
    /// Not an overlan stream.
    #[error("bad stream magic")]
    BadMagic,
    /// Unknown version.
    #[error("unsupported stream header version {0}")]
    Version(u8),
    /// Unknown kind.
    #[error("unknown stream kind {0:#04x}")]
    UnknownKind(u8),
}

impl StreamHeader {
    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = KIND_ATTACH;
        out[4..12].copy_from_slice(&self.socket.to_be_bytes());
        out
    }

    /// Parses a header.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, StreamHeaderError> {
        if bytes[0..2] != MAGIC {
            return Err(StreamHeaderError::BadMagic);
        }
        if bytes[2] != VERSION {
            return Err(StreamHeaderError::Version(bytes[2]));
        }
        if bytes[3] != KIND_ATTACH {
            return Err(StreamHeaderError::UnknownKind(bytes[3]));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[4..12]);
        Ok(Self { socket: u64::from_be_bytes(id) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(socket in any::<u64>()) {
            let h = StreamHeader { socket };
            prop_assert_eq!(StreamHeader::parse(&h.to_bytes()).unwrap(), h);
        }

        #[test]
        fn parse_never_panics(bytes in any::<[u8; HEADER_LEN]>()) {
            let _ = StreamHeader::parse(&bytes);
        }
    }
}
