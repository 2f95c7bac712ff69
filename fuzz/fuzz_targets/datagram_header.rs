//! Fuzzes the datagram header parser: any bytes parse or fail cleanly, and a parsed
//! header re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlan_shared::wire::datagram::{DatagramHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = DatagramHeader::parse(data) {
        assert_eq!(&header.to_bytes()[..], &data[..HEADER_LEN]);
    }
});
