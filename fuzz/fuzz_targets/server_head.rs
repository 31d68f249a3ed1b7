//! The gateway's HTTP/1.1 server head parser, content-length reader and response
//! framing (`meshgate_gateway::fuzzing::server_head` says what it asserts).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate_gateway::fuzzing::server_head(data));
