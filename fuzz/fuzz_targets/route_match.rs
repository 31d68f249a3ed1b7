//! The route matcher on a fixed table (`meshgate_gateway::fuzzing::route_match`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_gateway::fuzzing::route_match(data));
