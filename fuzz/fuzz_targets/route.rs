//! Route configuration and the paths matched against it: a pattern, tag templates, a path.
//! Input: the pattern, then the path, then templates, separated by `\0`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let pattern = fields.next().unwrap_or_default();
    let path = fields.next().unwrap_or_default();
    let templates: Vec<&str> = fields.take(8).collect();
    tower_cache_aside::__private::fuzz::route(pattern, &templates, path);
});
