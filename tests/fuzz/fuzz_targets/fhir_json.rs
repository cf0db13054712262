#![no_main]
// Harness: clinicsync_fuzz::fhir_json (tests/fuzz/src/lib.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| clinicsync_fuzz::fhir_json(data));
