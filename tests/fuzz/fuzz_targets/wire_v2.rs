#![no_main]
// Harness: clinicsync_fuzz::wire_v2 (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::wire_v2(data));
