#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shipperd_bundle::fuzzing::squashfs_tables(data));
