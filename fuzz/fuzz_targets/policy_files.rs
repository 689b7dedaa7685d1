//! The policy and inventory loader (`PolicySetBuilder::add_text` + `finish`, then
//! `compile`) on arbitrary file text. Invariants: see `microseg_fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microseg_fuzz::check_policy_files(data);
});
