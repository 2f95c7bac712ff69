//! Fuzzes the relay's control-frame decoder: any bytes, split anywhere, must decode to
//! messages or a clean error — never a panic, never unbounded buffering.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use overlan_shared::wire::frame::{ClientSideCodec, RelaySideCodec};

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize % (data.len() + 1);
    let relay = RelaySideCodec::new(4096);
    let mut buf = BytesMut::from(&data[..split]);
    while let Ok(Some(_)) = relay.decode_from(&mut buf) {}
    buf.extend_from_slice(&data[split..]);
    loop {
        match relay.decode_from(&mut buf) {
            Ok(Some(msg)) => {
                // Whatever decodes re-encodes and decodes to the same message.
                let client = ClientSideCodec::new(4096);
                let mut wire = BytesMut::new();
                client.encode_into(&msg, &mut wire).expect("a decoded message re-encodes");
                assert_eq!(relay.decode_from(&mut wire).expect("round trip").as_ref(), Some(&msg));
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The relay side's answers decode with the client codec without panicking, too.
    let client = ClientSideCodec::new(4096);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = client.decode_from(&mut buf) {}
});
