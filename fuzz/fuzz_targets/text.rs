//! Short texts read from outside: invalidation channel messages, percent-encoded paths.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    tower_cache_aside::__private::fuzz::notice(&text);
    tower_cache_aside::__private::fuzz::percent(&text);
});
