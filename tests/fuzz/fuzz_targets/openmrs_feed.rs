#![no_main]
// Harness: clinicsync_fuzz::openmrs_feed (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::openmrs_feed(data));
