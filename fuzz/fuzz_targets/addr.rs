//! The address parser never panics, and what it accepts prints back to a
//! string that parses to the same endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upcase::addr::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(ep) = s.parse::<Endpoint>() {
        let again: Endpoint = ep.to_string().parse().expect("display parses back");
        assert_eq!(again, ep);
    }
});
