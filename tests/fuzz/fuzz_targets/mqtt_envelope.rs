#![no_main]
// Harness: clinicsync_fuzz::mqtt_envelope (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::mqtt_envelope(data));
