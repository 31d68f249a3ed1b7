//! The upstream response head parser and body decoder, read whole and in two
//! pieces, and a chunked round trip (`meshgate_gateway::fuzzing::client_response`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_gateway::fuzzing::client_response(data));
