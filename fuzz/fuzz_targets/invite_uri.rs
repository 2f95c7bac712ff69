//! Fuzzes the invite URI parser (users paste these): parse or fail cleanly, and what
//! parses prints back to something that parses to the same invite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlan_shared::Invite;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(invite) = text.parse::<Invite>() {
            let again: Invite = invite.to_string().parse().expect("a printed invite parses");
            assert_eq!(again, invite);
        }
    }
});
