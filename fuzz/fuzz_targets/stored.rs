//! Bytes read back from a store: an entry, a store stamp, or garbage.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tower_cache_aside::__private::fuzz::stored(data);
});
