//! Fuzzes the stream header parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlan_shared::wire::stream::{StreamHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(bytes) = <[u8; HEADER_LEN]>::try_from(data) {
        if let Ok(header) = StreamHeader::parse(&bytes) {
            assert_eq!(header.to_bytes(), bytes);
        }
    }
});
