//! The agent's object parser (`parse_objects`, then `build_policy_set`, then
//! `compile`) on arbitrary file text. Invariants: see `microseg_fuzz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microseg_fuzz::check_agent_objects(data);
});
