#![no_main]
// Harness: clinicsync_fuzz::bundle (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::bundle(data));
